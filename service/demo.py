"""`d2lora demo`: the whole path on a laptop — build, train, upload, serve.

1. the demo base model (SmolLM2-135M-Instruct, converted once from GGUF),
2. the demo tasks' D²-LoRA adapters (trained once, a few minutes on CPU),
3. `d2lora serve` in this process; once it is ready each demo adapter is
   uploaded through `POST /adapters` (merged + verified like any upload),
4. then it prints how to call it, and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tarfile
import tempfile
from pathlib import Path

import httpx
import uvicorn

from service.serve import LOG_FORMAT, add_server_flags, settings_from
from service.settings import Settings

logger = logging.getLogger("d2lora.demo")
READY_TIMEOUT_S = 600
UPLOAD_TIMEOUT_S = 900


def pack_adapter(adapter_dir: Path, into: Path) -> Path:
    """The adapter folder as a .tar.gz (the `archive` upload form)."""
    archive = into / f"{adapter_dir.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(adapter_dir / name, arcname=name)
    return archive


async def wait_ready(client: httpx.AsyncClient) -> None:
    for _ in range(READY_TIMEOUT_S * 2):
        try:
            if (await client.get("/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {READY_TIMEOUT_S} s")


async def upload(client: httpx.AsyncClient, token: str, name: str, adapter_dir: Path) -> None:
    """POST /adapters unless the adapter is already registered (a restart of the demo)."""
    headers = {"Authorization": f"Bearer {token}"}
    if (await client.get(f"/adapters/{name}", headers=headers)).status_code == 200:
        logger.info("adapter %s: already registered", name)
        return
    with tempfile.TemporaryDirectory() as tmp, open(pack_adapter(adapter_dir, Path(tmp)), "rb") as archive:
        response = await client.post(
            "/adapters",
            headers=headers,
            data={"name": name},
            files={"archive": (f"{name}.tar.gz", archive)},
            timeout=UPLOAD_TIMEOUT_S,
        )
    response.raise_for_status()
    record = response.json()
    logger.info("adapter %s: %s in %.1f s", name, record.get("status"), record.get("merge_seconds") or 0)


def usage(base_url: str, names: list[str]) -> str:
    model = names[0] if names else "base"
    return f"""
d2lora demo is serving at {base_url}   (Ctrl-C stops it)
models: {", ".join(names)} and the base
  curl {base_url}/v1/models
  curl {base_url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "Hello", "max_tokens": 16, "temperature": 0}}'
  python -c "from openai import OpenAI; c = OpenAI(base_url='{base_url}/v1', api_key='none'); \\
r = c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi'}}]); \\
print(r.choices[0].message.content)"
"""


async def register_demo_adapters(base_url: str, token: str, adapters: dict[str, Path]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        await wait_ready(client)
        for name, adapter_dir in adapters.items():
            await upload(client, token, name, adapter_dir)
    print(usage(base_url, list(adapters)), flush=True)


async def serve_demo(settings: Settings, adapters: dict[str, Path]) -> None:
    from service.app import create_app
    from service.auth import admin_token

    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host, port=settings.port))
    base_url = f"http://{settings.host}:{settings.port}"
    uploads = asyncio.create_task(register_demo_adapters(base_url, admin_token(settings), adapters))
    await server.serve()
    uploads.cancel()


def run_demo(args: argparse.Namespace) -> int:
    from merger.demo import build_demo_model
    from merger.train.tasks import build_demo_adapters
    from service.app import resolve_settings

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = settings_from(args)
    base_dir = build_demo_model(settings.cache_dir)
    adapters = build_demo_adapters(settings.cache_dir, base_dir)
    settings = resolve_settings(settings.model_copy(update={"base_dir": base_dir}))
    asyncio.run(serve_demo(settings, adapters))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the demo model and adapters, then serve them")
    add_server_flags(p)
    p.set_defaults(func=run_demo, base_dir=None)
