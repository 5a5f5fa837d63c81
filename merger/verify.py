"""`verify`: prove that a merged checkpoint computes what the unmerged adapter computes.

The reference is the base model in float32 with the adapter applied on the fly
(merger.unmerged); the merged checkpoint runs in the dtype it was written in.
Both run on the fixed probe set of merger.probes; the merged weights are also
checked tensor by tensor against Ŵ recomputed in float64.  Metric definitions
and default thresholds are in merger.report.

A library call (the service uses it): importing this module loads no model,
and each call frees its models before it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from merger import formula
from merger.artifact import Adapter
from merger.checkpoint import CheckpointReader, checkpoint_shapes
from merger.dtypes import SAFETENSORS_DTYPES, dtype_name
from merger.errors import D2LoraError
from merger.kinds import AdapterKind, ModuleAdapter
from merger.merge import merge, resolve_dtype
from merger.probes import (
    NEW_TOKENS,
    ProbeBatch,
    build_probes,
    greedy_continuations,
    load_tokenizer,
    teacher_forced_logits,
)
from merger.report import EquivalenceReport, LogitMetrics, Thresholds, WeightError
from merger.unmerged import load_unmerged

REFERENCE_DTYPE = torch.float32
REFERENCE_NAME = "float32"


class VerifyError(D2LoraError):
    """verify cannot run (bad arguments, a merged folder that does not fit the base)."""


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """What one model produced on the probes."""

    greedy: torch.Tensor  # (probes, new_tokens)
    logits: torch.Tensor  # (positions, vocab) float32


def _run_reference(base_dir: Path, adapter: Adapter, probes: ProbeBatch) -> ModelRun:
    model = load_unmerged(base_dir, adapter, REFERENCE_DTYPE)
    greedy = greedy_continuations(model, probes)
    return ModelRun(greedy, teacher_forced_logits(model, probes, greedy))


def _run_checkpoint(
    folder: Path, dtype: torch.dtype, probes: ProbeBatch, forced: torch.Tensor | None = None
) -> ModelRun:
    """A plain checkpoint's greedy tokens, and its logits on `forced` (default: its own greedy tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    greedy = greedy_continuations(model, probes)
    return ModelRun(greedy, teacher_forced_logits(model, probes, greedy if forced is None else forced))


def first_divergence(reference: torch.Tensor, merged: torch.Tensor) -> list[int | None]:
    """Per probe, the index of the first differing greedy token, or None.  (probes, new) -> [probes]"""
    differs = reference != merged  # (probes, new)
    return [int(row.nonzero()[0]) if bool(row.any()) else None for row in differs]


def mean_kl(reference: torch.Tensor, merged: torch.Tensor) -> float:
    """Mean over positions of KL(p_ref ‖ p_merged), float64.  (positions, vocab) -> float"""
    log_ref = torch.log_softmax(reference.double(), dim=-1)
    log_merged = torch.log_softmax(merged.double(), dim=-1)
    return float((log_ref.exp() * (log_ref - log_merged)).sum(dim=-1).mean())


def logit_metrics(reference: ModelRun, merged: ModelRun) -> LogitMetrics:
    diff = (merged.logits - reference.logits).abs().max().item()
    divergence = first_divergence(reference.greedy, merged.greedy)
    new_tokens = reference.greedy.shape[1]
    agreed = sum(new_tokens if d is None else d for d in divergence)
    return LogitMetrics(
        positions=reference.logits.shape[0],
        max_abs_logit_diff=diff,
        relative_logit_error=diff / reference.logits.abs().max().item(),
        mean_kl=mean_kl(reference.logits, merged.logits),
        top1_agreement=(merged.logits.argmax(-1) == reference.logits.argmax(-1)).double().mean().item(),
        greedy_agreement=agreed / (len(divergence) * new_tokens),
        greedy_first_divergence=tuple(divergence),
    )


def effective_weight_float64(w0_stored: torch.Tensor, kind: AdapterKind, module: ModuleAdapter) -> torch.Tensor:
    """Ŵ in float64, torch layout: the unmerged forward evaluated on the identity.  -> (out, in)

    With x = I, W0 x and ΔW x (the kind's low-rank branch) are exact columns of
    W0 and ΔW, so formula.combine_outputs gives Ŵᵀ without the merge's code path.
    """
    w0 = (w0_stored.T if module.fan_in_fan_out else w0_stored).to(torch.float64)  # (out, in)
    identity = torch.eye(w0.shape[1], dtype=torch.float64)  # (in, in)
    delta_t = kind.delta_forward(identity, module)  # (in, out) = ΔWᵀ
    row_scale = kind.row_scale(w0.to(formula.COMPUTE_DTYPE), kind.delta(module), module)  # (out, 1) or None
    return formula.combine_outputs(w0.T, delta_t, row_scale, kind.add_residual).T  # (out, in)


def _module_error(
    base: CheckpointReader, merged: CheckpointReader, kind: AdapterKind, module: ModuleAdapter
) -> WeightError:
    expected = effective_weight_float64(base.read(module.weight_key), kind, module)  # (out, in)
    stored = merged.read(module.weight_key).to(torch.float64)
    actual = stored.T if module.fan_in_fan_out else stored  # (out, in)
    if actual.shape != expected.shape:
        return WeightError(float("inf"), float("inf"))
    max_abs = (actual - expected).abs().max().item()
    return WeightError(max_abs, max_abs / max(expected.abs().max().item(), torch.finfo(torch.float64).tiny))


def weight_errors(
    base: CheckpointReader, merged: CheckpointReader, kind: AdapterKind, bound: list[ModuleAdapter]
) -> dict[str, WeightError]:
    return {m.path: _module_error(base, merged, kind, m) for m in bound}


def tensor_name_problems(base: CheckpointReader, merged: CheckpointReader) -> tuple[str, ...]:
    problems = []
    for label, names in (
        ("missing from", base.tensors.keys() - merged.tensors.keys()),
        ("not in the base but in", merged.tensors.keys() - base.tensors.keys()),
    ):
        if names:
            problems.append(f"{len(names)} tensors {label} the merged checkpoint, e.g. {sorted(names)[0]}")
    return tuple(problems)


def untouched_abs_diff(base: CheckpointReader, merged: CheckpointReader, adapted: set[str]) -> float:
    """Max |merged − base cast to the merged dtype| over every tensor the adapter does not touch."""
    worst = 0.0
    for name in sorted((base.tensors.keys() & merged.tensors.keys()) - adapted):
        stored = merged.read(name)
        expected = base.read(name).to(stored.dtype)
        if stored.shape != expected.shape:
            return float("inf")
        worst = max(worst, (stored.double() - expected.double()).abs().max().item() if stored.numel() else 0.0)
    return worst


@contextlib.contextmanager
def merged_checkpoint(base_dir: Path, adapter_path: Path, merged_dir: Path | None, dtype: str) -> Iterator[Path]:
    """The merged folder given, or a temporary merge deleted afterwards."""
    if merged_dir is not None:
        if not merged_dir.is_dir():
            raise VerifyError(f"--merged: {merged_dir} is not a folder")
        yield merged_dir
        return
    with tempfile.TemporaryDirectory(prefix="d2lora-verify-") as tmp:
        yield merge(base_dir, adapter_path, Path(tmp) / "merged", dtype=dtype, progress=False).out_dir


def stored_dtype(reader: CheckpointReader, bound: list[ModuleAdapter]) -> torch.dtype:
    """The dtype the merged checkpoint holds its adapted weights in."""
    return SAFETENSORS_DTYPES[reader.tensors[bound[0].weight_key].spec.dtype]


def check_requested_dtype(requested: str, actual: torch.dtype) -> None:
    wanted = resolve_dtype(requested)
    if wanted is not None and wanted != actual:
        raise VerifyError(f"--dtype: {requested} asked for, but the merged checkpoint holds {actual}")


def _weight_checks(base_dir: Path, merged: CheckpointReader, adapter: Adapter, bound: list[ModuleAdapter]):
    with CheckpointReader(base_dir) as base:
        adapted = {m.weight_key for m in bound}
        return (
            weight_errors(base, merged, adapter.kind, bound),
            untouched_abs_diff(base, merged, adapted),
            tensor_name_problems(base, merged),
        )


def dtype_floor(base_dir: Path, dtype: torch.dtype, probes: ProbeBatch) -> LogitMetrics | None:
    """What the dtype alone costs: the base without adapter, float32 vs dtype (None for float32)."""
    if dtype == REFERENCE_DTYPE:
        return None
    reference = _run_checkpoint(base_dir, REFERENCE_DTYPE, probes)
    gc.collect()
    return logit_metrics(reference, _run_checkpoint(base_dir, dtype, probes, reference.greedy))


def _logit_checks(
    base_dir: Path, merged_dir: Path, adapter: Adapter, dtype: torch.dtype
) -> tuple[LogitMetrics, LogitMetrics | None]:
    probes = build_probes(load_tokenizer(base_dir))
    reference = _run_reference(base_dir, adapter, probes)
    gc.collect()  # each model is gone before the next one loads
    merged = _run_checkpoint(merged_dir, dtype, probes, reference.greedy)
    gc.collect()
    return logit_metrics(reference, merged), dtype_floor(base_dir, dtype, probes)


def _checked_merged_reader(merged_dir: Path, bound: list[ModuleAdapter]) -> CheckpointReader:
    reader = CheckpointReader(merged_dir)
    missing = [m.weight_key for m in bound if m.weight_key not in reader.tensors]
    if missing:
        reader.close()
        raise VerifyError(f"{merged_dir}: merged checkpoint lacks adapted tensor {missing[0]!r}")
    return reader


def verify(
    base_dir: str | Path,
    adapter_path: str | Path,
    merged_dir: str | Path | None = None,
    dtype: str = "auto",
    thresholds: Thresholds | None = None,
) -> EquivalenceReport:
    """Compare the merged checkpoint (made here when merged_dir is None) with the unmerged adapter.

    dtype: the merge's output dtype ("auto" = the base's stored dtype); with merged_dir it
    must match what that folder holds.  thresholds: default Thresholds.for_dtype(merged dtype).
    """
    start = time.perf_counter()
    base_dir, adapter_path = Path(base_dir), Path(adapter_path)
    adapter = Adapter.load(adapter_path)
    bound = adapter.bind(checkpoint_shapes(base_dir))
    with merged_checkpoint(base_dir, adapter_path, Path(merged_dir) if merged_dir else None, dtype) as folder:
        with _checked_merged_reader(folder, bound) as merged:
            merged_dtype = stored_dtype(merged, bound)
            check_requested_dtype(dtype, merged_dtype)
            errors, untouched, name_problems = _weight_checks(base_dir, merged, adapter, bound)
        logits, floor = _logit_checks(base_dir, folder, adapter, merged_dtype)
    gc.collect()
    report = EquivalenceReport(
        base=str(base_dir),
        adapter=str(adapter_path),
        merged=str(merged_dir) if merged_dir else None,
        kind=adapter.kind.name,
        reference_dtype=REFERENCE_NAME,
        merged_dtype=dtype_name(merged_dtype),
        probes=len(logits.greedy_first_divergence),
        new_tokens=NEW_TOKENS,
        logits=logits,
        weight_errors=errors,
        max_untouched_abs_diff=untouched,
        tensor_name_problems=name_problems,
        thresholds=thresholds or Thresholds.for_dtype(merged_dtype),
        seconds=time.perf_counter() - start,
        dtype_floor=floor,
    )
    return report.judged()
