"""An independent implementation of SPEC §1 for tests, written unlike merger.formula.

float64 numpy, one output row at a time in plain Python loops, ΔW's row summed
factor by factor.  It shares no code with the merger: files are read with
safetensors and json directly, keys are split here, kinds are plain functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."
FACTOR_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_A_neg.weight", "lora_B_neg.weight", "lora_magnitude_vector")


def _low_rank_row(a: np.ndarray, b: np.ndarray, i: int) -> np.ndarray:
    """Row i of B A, summed over the rank one factor at a time.  a: (r, in), b: (out, r) -> (in,)"""
    row = np.zeros(a.shape[1], dtype=np.float64)
    for k in range(a.shape[0]):
        row += b[i, k] * a[k]
    return row


def _norm(v: np.ndarray) -> float:
    return math.sqrt(sum(float(x) * float(x) for x in v))


def _lora_row(w0_row, delta_row, f, i):
    return w0_row + delta_row


def _dora_row(w0_row, delta_row, f, i):
    adapted = w0_row + delta_row
    return f["lora_magnitude_vector"][i] / _norm(adapted) * adapted


def _d2lora_row(w0_row, delta_row, f, i):
    adapted = w0_row + delta_row
    return _norm(w0_row) / _norm(adapted) * adapted + delta_row


ROW_RULES = {"LORA": _lora_row, "DORA": _dora_row, "D2LORA": _d2lora_row}


def reference_fuse(
    w0_stored: torch.Tensor,
    factors: dict[str, torch.Tensor],
    kind: str,
    scaling: float,
    tau: float = 0.5,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """Ŵ in float64, in the stored layout of w0.  Raises ZeroDivisionError on a zero-norm row."""
    w0 = w0_stored.double().numpy()
    w0 = w0.T if fan_in_fan_out else w0  # (out, in)
    f = {name: t.double().numpy() for name, t in factors.items()}
    rows = []
    for i in range(w0.shape[0]):
        delta = scaling * _low_rank_row(f["lora_A.weight"], f["lora_B.weight"], i)
        if "lora_A_neg.weight" in f:
            delta = delta - scaling * tau * _low_rank_row(f["lora_A_neg.weight"], f["lora_B_neg.weight"], i)
        rows.append(ROW_RULES[kind](w0[i], delta, f, i))
    fused = np.stack(rows)  # (out, in)
    return torch.from_numpy(np.ascontiguousarray(fused.T if fan_in_fan_out else fused))


def _split(key: str) -> tuple[str, str]:
    body = key[len(PREFIX) :]
    suffix = next(s for s in FACTOR_SUFFIXES if body.endswith("." + s))
    return body[: -len(suffix) - 1], suffix


def load_base_state(base_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(Path(base_dir).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def reference_weights(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """weight key -> dense Ŵ (float64) for every module the adapter folder adapts (no rank/alpha patterns)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    kind = "DORA" if config.get("use_dora") else config["peft_type"]
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(Path(adapter_dir) / "adapter_model.safetensors").items():
        path, name = _split(key)
        modules.setdefault(path, {})[name] = tensor
    base = load_base_state(base_dir)
    return {
        f"{path}.weight": reference_fuse(
            base[f"{path}.weight"], factors, kind, scaling, config.get("tau", 0.5), config.get("fan_in_fan_out", False)
        )
        for path, factors in modules.items()
    }
