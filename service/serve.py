"""`d2lora serve --base DIR [--engine vllm|transformers] [--host H] [--port P] [--data-dir DIR]`.

Flags override the D2LORA_* environment (service.settings.Settings); `d2lora demo` takes the same flags.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from service.settings import Settings, load_settings

FLAGS = {"base_dir": "--base", "engine": "--engine", "host": "--host", "port": "--port", "data_dir": "--data-dir"}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment's settings, overridden by the flags given; a bad value is one SettingsError line."""
    overrides = {field: getattr(args, field) for field in FLAGS if getattr(args, field, None) is not None}
    return load_settings(overrides, {field: FLAGS[field] for field in overrides})


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import EXIT_ENGINE_DEAD, create_app, resolve_settings

    settings = resolve_settings(settings_from(args))  # a bad --base or setting: one line, exit 2, nothing started
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    app.state.shutdown = lambda: setattr(server, "should_exit", True)
    server.run()
    return EXIT_ENGINE_DEAD if app.state.engine_dead else 0


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The flags `serve` and `demo` share (all but --base)."""
    p.add_argument("--engine", help="vllm (default) | transformers")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--data-dir", dest="data_dir", type=Path, help="adapter records, fused tensors, admin token")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the base and its adapters (OpenAI API + /adapters)")
    p.add_argument("--base", dest="base_dir", type=Path, help="base model folder (default: $D2LORA_BASE_DIR)")
    add_server_flags(p)
    p.set_defaults(func=run_serve)
