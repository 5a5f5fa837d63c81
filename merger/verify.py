"""`verify`: prove that a merged model computes what the unmerged adapter computes, a layer at a time.

The reference is the base in float32 with the adapter applied on the fly (merger.unmerged); the
merged model runs in the dtype its tensors hold.  Both are read from their checkpoints a layer at
a time (merger.streaming), so memory stays about one layer whatever the model's size:

1. the merged model decodes NEW_TOKENS greedy tokens per probe with a KV cache: its greedy path, and
   its logits at every position of prompt + path (one step past the path's last token);
2. the unmerged reference is teacher-forced along that path; while a layer's tensors are mapped
   they are also checked, adapted weights against Ŵ in float64 and every other tensor against the
   base (merger.tensorcheck).

At each step of the path the unmerged model's top-1 is what its own greedy decode would pick as
long as the path so far is its own, so the first step where that top-1 differs from the path is
where the two greedy decodes part: one decode is enough, and the merged model's logits are its
decode's, so it needs no teacher-forced pass of its own.  A reduced-precision merge is also judged
against the dtype floor, the base alone in float32 vs that dtype run the same way in the same
passes (or read from a merger.floors.FloorCache).  Metric definitions and thresholds: merger.report;
the logit metrics are tallied a block of positions at a time (merger.logits).

The merged model is a merged checkpoint folder (`merged_dir`), a file of fused tensors over the base
(`fused`: what the server keeps), or, with neither, the adapter fused into a temporary file.
A library call (the service uses it): importing this module loads no model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from merger.archive import DEFAULT_LIMITS, ArchiveLimits
from merger.artifact import Adapter
from merger.checkpoint import CheckpointReader, StoredTensor, file_tensors
from merger.dtypes import SAFETENSORS_DTYPES, dtype_name
from merger.errors import D2LoraError
from merger.floors import FloorCache, floor_key
from merger.kinds import ModuleAdapter
from merger.logits import LogitTally, first_divergence
from merger.merge import fuse_into_file, layer_bar, resolve_dtype
from merger.probes import (
    NEW_TOKENS,
    Decoded,
    ProbeBatch,
    build_probes,
    continuation_top1,
    load_tokenizer,
    streamed_decode,
    streamed_forced_hidden,
)
from merger.report import EquivalenceReport, LogitMetrics, Thresholds
from merger.streamed_modules import TensorPool
from merger.streaming import StreamedModel, StreamError
from merger.tensorcheck import TensorChecks, tensor_name_problems

REFERENCE_DTYPE = torch.float32
REFERENCE_NAME = "float32"
LOGIT_BLOCK = 128  # positions whose logits a model forms at once (its head is streamed once per block)


class VerifyError(D2LoraError):
    """verify cannot run (bad arguments, a merged model that does not fit the base)."""


# the merged model's tensors


@dataclasses.dataclass(frozen=True)
class MergedSource:
    tensors: Mapping[str, StoredTensor]  # checkpoint name -> where it is stored
    config_dir: Path  # the config.json its model is built from
    label: str | None  # what the report names (None: a temporary fuse)


def _overlay(base: Mapping[str, StoredTensor], fused: Path, base_dir: Path, label: str | None) -> MergedSource:
    if not fused.is_file():
        raise VerifyError(f"{fused}: no such file of fused tensors")
    return MergedSource({**base, **file_tensors(fused)}, base_dir, label)


@contextlib.contextmanager
def merged_source(
    base_dir: Path,
    base: Mapping[str, StoredTensor],
    adapter_path: Path,
    merged_dir: Path | None,
    fused: Path | None,
    dtype: str,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> Iterator[MergedSource]:
    """The merged folder, the fused file over the base, or the adapter fused into a temporary file."""
    if merged_dir is not None and fused is not None:
        raise VerifyError("give a merged folder or a fused-tensors file, not both")
    if merged_dir is not None:
        if not merged_dir.is_dir():
            raise VerifyError(f"--merged: {merged_dir} is not a folder")
        with CheckpointReader(merged_dir) as reader:
            yield MergedSource(dict(reader.tensors), merged_dir, str(merged_dir))
        return
    if fused is not None:
        yield _overlay(base, fused, base_dir, str(fused))
        return
    with tempfile.TemporaryDirectory(prefix="d2lora-verify-") as tmp:
        written = fuse_into_file(base_dir, adapter_path, Path(tmp) / "fused.safetensors", dtype, limits).out_file
        yield _overlay(base, written, base_dir, None)


def stored_dtype(source: MergedSource, bound: list[ModuleAdapter]) -> torch.dtype:
    """The dtype the merged model holds its adapted weights in (every one must be there)."""
    missing = [m.weight_key for m in bound if m.weight_key not in source.tensors]
    if missing:
        raise VerifyError(
            f"{source.label or 'the fused tensors'}: the merged model lacks adapted tensor {missing[0]!r}"
        )
    return SAFETENSORS_DTYPES[source.tensors[bound[0].weight_key].spec.dtype]


def check_requested_dtype(requested: str, actual: torch.dtype) -> None:
    wanted = resolve_dtype(requested)
    if wanted is not None and wanted != actual:
        raise VerifyError(f"--dtype: {requested} asked for, but the merged checkpoint holds {actual}")


# the probes, streamed


@dataclasses.dataclass(frozen=True)
class ProbeComparison:
    path: torch.Tensor  # (probes, new): the merged model's greedy tokens
    logits: LogitMetrics  # unmerged float32 vs merged, along `path`
    floor: LogitMetrics | None  # the base alone, float32 vs the merged dtype (when asked for)


def _merged_model(source: MergedSource, dtype: torch.dtype, pool: TensorPool) -> StreamedModel:
    try:
        return StreamedModel(source.config_dir, source.tensors, dtype, pool)
    except StreamError as err:
        raise VerifyError(f"{source.label or 'the fused tensors'}: does not fit the base ({err})") from None


@torch.inference_mode()
def _pair_metrics(
    reference: StreamedModel, forced: torch.Tensor, other: StreamedModel, decoded: Decoded, probes: ProbeBatch
) -> LogitMetrics:
    """Metrics of `other` against `reference` teacher-forced along other's greedy path.  forced: (positions, h)"""
    tally = LogitTally()
    for reference_hidden, other_hidden in zip(
        forced.split(LOGIT_BLOCK), decoded.states.split(LOGIT_BLOCK), strict=True
    ):
        tally.add(reference.logits(reference_hidden), other.logits(other_hidden))  # (block, vocab) each
    divergence = first_divergence(continuation_top1(tally.top1(), probes, decoded.path), decoded.path)
    return tally.metrics(divergence, decoded.path.shape[1])


def compare_on_probes(
    base_dir: Path,
    base: Mapping[str, StoredTensor],
    source: MergedSource,
    adapter: Adapter,
    bound: list[ModuleAdapter],
    dtype: torch.dtype,
    probes: ProbeBatch,
    with_floor: bool,
    progress: bool | None = None,
) -> tuple[ProbeComparison, TensorChecks]:
    """The two streamed passes (greedy decode, then teacher-forced with the tensor checks), and their metrics.

    With the floor, the base in `dtype` decodes beside the merged model and the base in float32 is
    teacher-forced along its path beside the reference.
    """
    pool = TensorPool()
    reference = StreamedModel(base_dir, base, REFERENCE_DTYPE, pool, adapter=adapter)
    merged = _merged_model(source, dtype, pool)
    floor_models = [StreamedModel(base_dir, base, d, pool) for d in (REFERENCE_DTYPE, dtype)] if with_floor else []
    checks = TensorChecks(pool, base, source.tensors, adapter.kind, bound)
    with layer_bar("verify", len(reference.layers) * (NEW_TOKENS + 2), progress) as bar:

        def after_decoding_layer(index: int) -> None:
            bar.update()

        def after_layer(index: int) -> None:
            checks.check({*reference.layer_keys(index), *merged.layer_keys(index)})
            bar.update()

        decoded = streamed_decode([merged, *floor_models[1:]], probes, NEW_TOKENS, after_decoding_layer)
        paths = [d.path for d in decoded]  # the merged model's, then the low-precision base's
        forced = streamed_forced_hidden([reference, *floor_models[:1]], probes, paths, after_layer)
    checks.check_rest()
    logits = _pair_metrics(reference, forced[0], merged, decoded[0], probes)
    floor = _pair_metrics(floor_models[0], forced[1], floor_models[1], decoded[1], probes) if with_floor else None
    return ProbeComparison(decoded[0].path, logits, floor), checks


def verify(
    base_dir: str | Path,
    adapter_path: str | Path,
    merged_dir: str | Path | None = None,
    dtype: str = "auto",
    thresholds: Thresholds | None = None,
    fused: str | Path | None = None,
    floor_cache: FloorCache | None = None,
    progress: bool | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> EquivalenceReport:
    """Compare the merged model with the unmerged adapter on the probes and tensor by tensor.

    merged_dir: a merged checkpoint folder; fused: a file of fused tensors over the base (merger.merge.
    fuse_into_file); neither: the adapter is fused into a temporary file first.  dtype: the merge's
    output dtype ("auto" = the base's stored dtype); with merged_dir or fused it must match what is
    there.  thresholds: default Thresholds.for_dtype(merged dtype).  floor_cache: where the dtype
    floor is kept between calls.  progress: a bar per layer (None: on a terminal only).  limits: what
    the adapter artifact may unpack to.
    """
    start = time.perf_counter()
    base_dir, adapter_path = Path(base_dir), Path(adapter_path)
    adapter = Adapter.load(adapter_path, limits)
    with CheckpointReader(base_dir) as reader:
        base = dict(reader.tensors)
    bound = adapter.bind({name: t.spec.shape for name, t in base.items()})
    probes = build_probes(load_tokenizer(base_dir))
    merged_path, fused_path = (Path(p) if p else None for p in (merged_dir, fused))
    with merged_source(base_dir, base, adapter_path, merged_path, fused_path, dtype, limits) as source:
        merged_dtype = stored_dtype(source, bound)
        check_requested_dtype(dtype, merged_dtype)
        key = floor_key(base_dir, merged_dtype, probes) if floor_cache and merged_dtype != REFERENCE_DTYPE else None
        floor = floor_cache.get(key) if floor_cache and key else None
        with_floor = merged_dtype != REFERENCE_DTYPE and floor is None
        comparison, checks = compare_on_probes(
            base_dir, base, source, adapter, bound, merged_dtype, probes, with_floor, progress
        )
        if comparison.floor is not None:
            floor = comparison.floor
            if floor_cache and key:
                floor_cache.put(key, base_dir, merged_dtype, floor)
        report = EquivalenceReport(
            base=str(base_dir),
            adapter=str(adapter_path),
            merged=source.label,
            kind=adapter.kind.name,
            reference_dtype=REFERENCE_NAME,
            merged_dtype=dtype_name(merged_dtype),
            probes=len(comparison.logits.greedy_first_divergence),
            new_tokens=NEW_TOKENS,
            logits=comparison.logits,
            weight_errors=checks.sorted_weight_errors(),
            max_untouched_abs_diff=checks.max_untouched_abs_diff,
            tensor_name_problems=tensor_name_problems(base, source.tensors),
            thresholds=thresholds or Thresholds.for_dtype(merged_dtype),
            seconds=time.perf_counter() - start,
            dtype_floor=floor,
            worst_untouched=checks.worst_untouched,
        )
    return report.judged()
