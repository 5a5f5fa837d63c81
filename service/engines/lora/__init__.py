"""d2lora-serve's vLLM plugin: per-request adapters of every kind (D²-LoRA, DoRA, LoRA) in one batch, exactly.

vLLM applies a LoRA adapter as y = W0 x + B A x.  Every kind the merger fuses
is y = d ⊙ (W0 x) + B̃ A x with a per-row scale d (SPEC §1, merger.per_request),
so the plugin adds the row scale to vLLM's LoRA linear layers and loads it from
the per-request form folder, and on CPU replaces vLLM's per-token weight
gathers with grouped matmuls:

- layers.py   `_apply_sync` / `_apply_base_forward` of BaseLinearLayerWithLoRA
- manager.py  `LoRAModel.from_local_checkpoint`, `LoRAModelManager.activate_adapter`
- punica.py   the CPU platform's punica wrapper (ops.py: the grouped ops)

Loaded in every vLLM process through the `vllm.general_plugins` entry point
(`register`) when D2LORA_VLLM_PLUGIN=1 (our engine sets it; a plain `vllm serve`
in the same environment stays stock vLLM unless its user sets it too), and by
the engine's worker extension (service.engines.vllm_worker) when it is imported,
so a checkout run without reinstalling gets it too.
`install` is idempotent; on a vLLM release not in versions.SUPPORTED it changes
nothing (the engine refuses to start instead, in one line).
"""

from __future__ import annotations

import logging
import os

from service.engines.lora.versions import unsupported_reason

logger = logging.getLogger(__name__)
_installed = False
ENABLE_VARIABLE = "D2LORA_VLLM_PLUGIN"


def installed() -> bool:
    return _installed


def install() -> bool:
    """Patch the installed vLLM (once per process); False, with a one-line warning, when it is not supported."""
    global _installed
    if _installed:
        return True
    reason = unsupported_reason()
    if reason is not None:
        logger.warning("d2lora per-request adapters disabled: %s", reason)
        return False
    _patch()
    _installed = True
    return True


def register() -> None:
    """The `vllm.general_plugins` entry point: installs only when D2LORA_VLLM_PLUGIN=1."""
    if os.environ.get(ENABLE_VARIABLE) == "1":
        install()


def _patch() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.platforms import current_platform

    from service.engines.lora import layers, manager

    loader = vars(LoRAModel)["from_local_checkpoint"].__func__
    patches: list[tuple[type, str, object]] = [
        (BaseLinearLayerWithLoRA, "_apply_sync", layers.apply_sync),
        (BaseLinearLayerWithLoRA, "_apply_base_forward", layers.apply_base_forward),
        (LoRAModelManager, "activate_adapter", manager.wrap_activate_adapter(LoRAModelManager.activate_adapter)),
        (LoRAModel, "from_local_checkpoint", classmethod(manager.wrap_from_local_checkpoint(loader))),
    ]
    if current_platform.is_cpu():
        from service.engines.lora.punica import QUALNAME

        patches.append((type(current_platform), "get_punica_wrapper", classmethod(lambda cls: QUALNAME)))
    for owner, name, value in patches:
        setattr(owner, name, value)
