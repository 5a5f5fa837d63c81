"""Random adapter artifacts (SPEC §2) for tests: D²-LoRA, PEFT LoRA and PEFT DoRA.

The factors are seeded random with B non-zero, so the update ΔW is real and a
merge that drops or mangles it is visible.  Shapes come from the base
checkpoint itself, so any model from tests/tiny.py (or the demo model) works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from merger.checkpoint import CheckpointReader
from merger.config import AdapterConfig
from merger.formula import lora_scaling, row_norm

# model_type -> (target_modules, fan_in_fan_out)
DEFAULT_TARGETS = {"gpt2": (["c_attn", "c_proj"], True)}
LLAMA_TARGETS = (["q_proj", "k_proj", "v_proj", "o_proj"], False)
PEFT_TYPES = {"D2LORA": "D2LORA", "LORA": "LORA", "DORA": "LORA"}


def default_targets(base_dir: Path) -> tuple[list[str], bool]:
    """The attention projections of the base's architecture, and whether they are Conv1D."""
    model_type = json.loads((Path(base_dir) / "config.json").read_text()).get("model_type")
    return DEFAULT_TARGETS.get(model_type, LLAMA_TARGETS)


def adapter_config(
    base_dir: Path, kind: str, r: int, alpha: float, tau: float, targets: list[str] | None, **extra
) -> dict:
    """adapter_config.json for a kind; `extra` adds or overrides fields (rank_pattern, use_rslora, ...)."""
    default, fan_in_fan_out = default_targets(base_dir)
    config = {
        "peft_type": PEFT_TYPES[kind],
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": targets or default,
        "base_model_name_or_path": Path(base_dir).name,
    }
    if kind == "D2LORA":
        config["tau"] = tau
    if kind == "DORA":
        config["use_dora"] = True
    return {**config, **extra}


def targeted_modules(reader: CheckpointReader, config: AdapterConfig) -> dict[str, tuple[int, int]]:
    """module path -> (out, in) for every 2-D base weight the config targets."""
    modules = {}
    for key, shape in reader.shapes().items():
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and len(shape) == 2 and config.targets(path):
            modules[path] = tuple(reversed(shape)) if config.fan_in_fan_out else tuple(shape)
    return modules


def _low_rank_pair(
    gen: torch.Generator, r: int, out_features: int, in_features: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(r, in_features, generator=gen) / in_features**0.5  # (r, in)
    b = torch.randn(out_features, r, generator=gen) * scale  # (out, r)
    return a, b


def _magnitude(gen: torch.Generator, w0_stored: torch.Tensor, fan_in_fan_out: bool, scale: float) -> torch.Tensor:
    """DoRA's m: the base row norms, perturbed by a relative `scale`.  -> (out,)"""
    w0 = w0_stored.T if fan_in_fan_out else w0_stored  # (out, in)
    norms = row_norm(w0.float()).squeeze(1).float()  # (out,)
    return norms * (1 + scale * torch.randn(norms.shape, generator=gen))


def module_factors(gen: torch.Generator, kind: str, r: int, shape: tuple[int, int], scale: float) -> dict:
    out_features, in_features = shape
    a, b = _low_rank_pair(gen, r, out_features, in_features, scale)
    factors = {"lora_A.weight": a, "lora_B.weight": b}
    if kind == "D2LORA":
        a_neg, b_neg = _low_rank_pair(gen, r, out_features, in_features, scale)
        factors.update({"lora_A_neg.weight": a_neg, "lora_B_neg.weight": b_neg})
    return factors


def _dense_delta(factors: dict, scaling: float, tau: float) -> torch.Tensor:
    """s·(B₊A₊ − τB₋A₋), or s·BA without the negative pair.  -> (out, in)"""
    delta = factors["lora_B.weight"] @ factors["lora_A.weight"]
    if "lora_B_neg.weight" in factors:
        delta = delta - tau * factors["lora_B_neg.weight"] @ factors["lora_A_neg.weight"]
    return scaling * delta


def _resize_update(
    factors: dict, w0_stored: torch.Tensor, parsed: AdapterConfig, path: str, relative_size: float
) -> None:
    """Rescale the B factors in place so that ‖ΔW‖_F = relative_size · ‖W0‖_F."""
    scaling = lora_scaling(parsed.alpha_for(path), parsed.rank_for(path), parsed.use_rslora)
    ratio = relative_size * w0_stored.float().norm() / _dense_delta(factors, scaling, parsed.tau).norm()
    for name in ("lora_B.weight", "lora_B_neg.weight"):
        if name in factors:
            factors[name] = factors[name] * ratio


def random_adapter_tensors(
    base_dir: Path,
    kind: str,
    config: dict,
    seed: int,
    scale: float,
    dtype: torch.dtype,
    relative_size: float | None = None,
) -> dict[str, torch.Tensor]:
    parsed = AdapterConfig.from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    reader = CheckpointReader(base_dir)
    tensors = {}
    try:
        for path, shape in sorted(targeted_modules(reader, parsed).items()):
            factors = module_factors(gen, kind, parsed.rank_for(path), shape, scale)
            w0 = reader.read(f"{path}.weight")
            if relative_size is not None:
                _resize_update(factors, w0, parsed, path, relative_size)
            if kind == "DORA":
                factors["lora_magnitude_vector"] = _magnitude(gen, w0, parsed.fan_in_fan_out, scale)
            tensors.update({f"base_model.model.{path}.{name}": t.to(dtype) for name, t in factors.items()})
    finally:
        reader.close()
    return tensors


def write_random_adapter(
    out_dir: str | Path,
    base_dir: str | Path,
    kind: str = "D2LORA",
    r: int = 4,
    alpha: float = 8,
    tau: float = 0.5,
    seed: int = 0,
    scale: float = 0.05,
    targets: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    relative_size: float | None = None,
    **extra_config,
) -> Path:
    """Write a random `kind` adapter ("D2LORA" | "LORA" | "DORA") for base_dir into out_dir.

    `scale` sets the size of B (and DoRA's relative change of m); `relative_size`, when
    given, instead rescales B so that every module's ‖ΔW‖_F is that fraction of ‖W0‖_F
    (0.05: a realistic fine-tune); `extra_config`
    adds adapter_config.json fields, e.g. rank_pattern={"q_proj": 2}, use_rslora=True.
    """
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    config = adapter_config(base_dir, kind, r, alpha, tau, targets, **extra_config)
    tensors = random_adapter_tensors(base_dir, kind, config, seed, scale, dtype, relative_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, out_dir / "adapter_model.safetensors")
    return out_dir


def random_factors(kind: str, out: int, inp: int, r: int, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    factors = {
        "lora_A.weight": torch.randn(r, inp, generator=gen),
        "lora_B.weight": scale * torch.randn(out, r, generator=gen),
    }
    if kind == "D2LORA":
        factors["lora_A_neg.weight"] = torch.randn(r, inp, generator=gen)
        factors["lora_B_neg.weight"] = scale * torch.randn(out, r, generator=gen)
    if kind == "DORA":
        factors["lora_magnitude_vector"] = 1 + torch.rand(out, generator=gen)
    return factors
