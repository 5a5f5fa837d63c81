"""How long a sequence an engine accepts: D2LORA_MAX_MODEL_LEN, by default the model's own context."""

from __future__ import annotations

from pathlib import Path

from merger.errors import D2LoraError
from service.settings import Settings


class ContextLengthError(D2LoraError):
    """max_model_len cannot be resolved, or asks for more than the model supports."""


def model_context_length(base_dir: Path) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings; GPT-2's n_positions), if it says."""
    from transformers import AutoConfig

    length = getattr(AutoConfig.from_pretrained(base_dir), "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def resolve_max_model_len(settings: Settings, base_dir: Path) -> int:
    """settings.max_model_len, or the model's context when unset; longer than the model's own is an error."""
    own = model_context_length(base_dir)
    if settings.max_model_len is None:
        if own is None:
            raise ContextLengthError(f"{base_dir}: config.json gives no context length; set D2LORA_MAX_MODEL_LEN")
        return own
    if own is not None and settings.max_model_len > own:
        raise ContextLengthError(
            f"D2LORA_MAX_MODEL_LEN={settings.max_model_len} is longer than the model's context ({own} tokens)"
        )
    return settings.max_model_len
