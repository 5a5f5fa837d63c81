"""The whole-model oracle of `d2lora verify`: its metrics with every model loaded whole by transformers.

The same probes and merger.verify's own metric functions, but no streaming and no shortcut: the unmerged
reference decodes its own greedy tokens too, so the first divergence is read off two real decodes
rather than inferred from the reference's top-1 along the merged model's path (the merged model's logits
are its decode's, as in verify: the logits a model serves with).  And the streamed side:
merger.verify's comparison of the same models, with the greedy path it decoded.  The whole models'
Linears multiply with the kernel the streamed ones use for their dtype on this CPU (merger.cpu_linear).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from merger.artifact import Adapter
from merger.checkpoint import CheckpointReader
from merger.cpu_linear import kernel_for
from merger.logits import first_divergence, logit_metrics
from merger.probes import NEW_TOKENS, build_probes, greedy_decode, load_tokenizer, teacher_forced_logits
from merger.report import LogitMetrics
from merger.unmerged import load_unmerged
from merger.verify import ProbeComparison, compare_on_probes, merged_source


class _KernelLinear(torch.nn.Module):
    """An nn.Linear multiplied by merger.cpu_linear's kernel for its dtype, as a streamed Linear is."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear, self.kernel = linear, kernel_for(linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.kernel.linear(x, self.linear.weight, self.linear.bias)


def _load(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A whole transformers model in `dtype`, its Linears on the streamed kernels, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    for path, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, _KernelLinear(module))
    return model


@dataclasses.dataclass(frozen=True)
class WholeRun:
    path: torch.Tensor  # (probes, new): the merged model's greedy tokens
    reference_greedy: torch.Tensor  # (probes, new): the unmerged model's own greedy tokens
    logits: LogitMetrics


def _compare_whole(reference: torch.nn.Module, merged: torch.nn.Module, probes) -> WholeRun:
    decoded = greedy_decode(merged, probes)
    reference_greedy = greedy_decode(reference, probes).path
    metrics = logit_metrics(
        teacher_forced_logits(reference, probes, decoded.path),
        decoded.states,
        first_divergence(reference_greedy, decoded.path),
        NEW_TOKENS,
    )
    return WholeRun(decoded.path, reference_greedy, metrics)


def whole_model_run(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: torch.dtype) -> WholeRun:
    """Unmerged float32 vs the merged checkpoint in `dtype`, both loaded whole."""
    probes = build_probes(load_tokenizer(base_dir))
    reference = load_unmerged(base_dir, Adapter.load(adapter_dir))
    merged = _load(merged_dir, dtype)
    return _compare_whole(reference, merged, probes)


def whole_model_floor(base_dir: Path, dtype: torch.dtype) -> WholeRun:
    """The dtype floor: the base alone, float32 vs `dtype`, both loaded whole."""
    probes = build_probes(load_tokenizer(base_dir))
    return _compare_whole(_load(base_dir, torch.float32), _load(base_dir, dtype), probes)


def streamed_run(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: torch.dtype) -> ProbeComparison:
    """merger.verify's streamed comparison of the same two models (and the dtype floor below float32)."""
    adapter = Adapter.load(adapter_dir)
    with CheckpointReader(base_dir) as reader:
        base = dict(reader.tensors)
    bound = adapter.bind({name: t.spec.shape for name, t in base.items()})
    probes = build_probes(load_tokenizer(base_dir))
    with merged_source(base_dir, base, adapter_dir, merged_dir, None, "auto") as source:
        comparison, _ = compare_on_probes(
            base_dir, base, source, adapter, bound, dtype, probes, with_floor=dtype != torch.float32
        )
    return comparison
