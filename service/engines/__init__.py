"""Serving engines, named in a lazy table: importing the table loads no engine (nor torch).

`engine_class(name)` imports the one asked for; the app factory resolves it from the settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from collections.abc import Callable

    from service.engines.base import Engine
    from service.settings import Settings

EngineName = Literal["vllm", "transformers"]
ENGINE_CLASSES: dict[str, str] = {
    "vllm": "service.engines.vllm:VllmEngine",
    "transformers": "service.engines.hf:TransformersEngine",
}
assert set(ENGINE_CLASSES) == set(get_args(EngineName)), "EngineName and ENGINE_CLASSES must list the same engines"


def engine_class(name: str) -> type[Engine]:
    """The Engine class registered under `name` (imported on first use)."""
    module, _, attribute = ENGINE_CLASSES[name].partition(":")
    engine: type[Engine] = getattr(importlib.import_module(module), attribute)
    return engine


def engine_factory(settings: Settings) -> Callable[[], Engine]:
    """Builds one engine of the configured kind per call (the scheduler starts `max_resident` of them)."""
    engine = engine_class(settings.engine)
    return lambda: engine(settings)
