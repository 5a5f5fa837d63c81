"""`d2lora serve --base DIR [--engine vllm|transformers] [--host H] [--port P] [--data-dir DIR]`.

Flags override the D2LORA_* environment (service.settings.Settings).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from service.settings import Settings

FLAGS = ("base_dir", "engine", "host", "port", "data_dir")


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {flag: getattr(args, flag) for flag in FLAGS if getattr(args, flag) is not None}
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import EXIT_ENGINE_DEAD, base_model_dir, check_engine, create_app

    settings = settings_from(args)
    base_model_dir(settings)  # a bad --base or --engine is one line and exit 2, before anything starts
    check_engine(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)
    )
    app.state.shutdown = lambda: setattr(server, "should_exit", True)
    server.run()
    return EXIT_ENGINE_DEAD if app.state.engine_dead else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the base and its adapters (OpenAI API + /adapters)")
    p.add_argument("--base", dest="base_dir", type=Path, help="base model folder (default: $D2LORA_BASE_DIR)")
    p.add_argument("--engine", help="vllm (default) | transformers")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--data-dir", dest="data_dir", type=Path, help="adapter records, fused tensors, admin token")
    p.set_defaults(func=run_serve)
