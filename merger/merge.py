"""The streaming merge: base shards + adapter -> a standalone HF checkpoint, or just the fused tensors.

`merge` writes the whole checkpoint; `fuse_into_file` writes only the tensors
the adapter changes into one safetensors file (what the server swaps in over
the base).  Everything is validated before the first byte is written; output
goes to a temporary sibling that is renamed into place only when complete, so
a failed or interrupted merge leaves nothing at its destination.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from merger.archive import DEFAULT_LIMITS, ArchiveLimits
from merger.artifact import Adapter
from merger.checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    MappedTensor,
    ShardWriter,
    TensorSpec,
    layer_of,
    plan_shards,
    shard_name,
    write_index,
)
from merger.dtypes import OUTPUT_DTYPES, SAFETENSORS_DTYPES, SAFETENSORS_NAMES, dtype_name
from merger.errors import D2LoraError
from merger.formula import FusionError
from merger.fs import PICKLE_WEIGHTS, WEIGHT_SUFFIXES, atomic_dir, atomic_file, write_atomic
from merger.kinds import AdapterKind, ModuleAdapter, RowScaledLowRank, joined_row_scale
from merger.memory import give_back_free_memory, giving_back

DEFAULT_MAX_SHARD_BYTES = 2 << 30
# torch intra-op threads while fusing.  The merge is I/O-bound and its maths (a few
# element-wise passes per targeted weight) memory-bound, so more threads buy little;
# on a busy host their spin-waits cost more than they save: a 2.6 GB merge on 2
# shared cores took 2× the wall time with 2 threads as with 1 (benchmarks/merge_bench.py).
MERGE_THREADS = 1
PROVENANCE_NAME = "d2lora_merge.json"


class MergeError(D2LoraError):
    """The merge cannot proceed (bad arguments, existing output)."""


@dataclasses.dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    seconds: float
    fused_modules: int
    tensors: int
    bytes_written: int


@dataclasses.dataclass(frozen=True)
class FuseResult:
    out_file: Path
    seconds: float
    fused_modules: int
    bytes_written: int


def resolve_dtype(name: str) -> torch.dtype | None:
    if name not in OUTPUT_DTYPES:
        raise MergeError(f"--dtype: {name!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[name]


def _output_spec(spec: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    if dtype is None or not SAFETENSORS_DTYPES[spec.dtype].is_floating_point:
        return spec
    return dataclasses.replace(spec, dtype=SAFETENSORS_NAMES[dtype])


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        raise MergeError(f"--out: {out_dir} already exists")


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run torch ops of the calling thread on `count` threads (None: unchanged), then restore.

    With torch's OpenMP backend the setting belongs to the calling thread, so a
    server's other threads keep theirs (a thread that first runs torch during the
    merge starts with `count`).
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MergeError(f"threads: must be a positive integer or None, got {threads!r}")


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """merger.fs.atomic_dir, with an unusable --out as a one-line MergeError."""
    check_out_dir(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MergeError(f"--out: cannot create {out_dir} ({err.strerror})") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise MergeError(f"--out: cannot create {out_dir} (its folder is not writable)")
    with atomic_dir(out_dir) as tmp:
        yield tmp


def copy_side_files(base_dir: Path, out_dir: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer and generation files; weights and pickles are not copied."""
    for src in sorted(base_dir.iterdir()):
        if src.is_file() and not src.name.endswith(WEIGHT_SUFFIXES) and src.name not in (INDEX_NAME, *PICKLE_WEIGHTS):
            shutil.copy2(src, out_dir / src.name)
    config_path = out_dir / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["dtype"] = dtype_name(dtype)
        config.pop("torch_dtype", None)
        write_atomic(config_path, json.dumps(config, indent=2) + "\n")


def _cast_fused(fused: torch.Tensor, dtype: torch.dtype, module: ModuleAdapter) -> torch.Tensor:
    """The one cast of Ŵ to the output dtype; values beyond its range are an error, not ±inf."""
    cast = fused.to(dtype)
    if dtype != fused.dtype and not bool(torch.isfinite(cast).all()):  # fused itself was checked in fp32
        raise FusionError(f"{module.path}: fused weight overflows {dtype_name(dtype)}")
    return cast


def write_fused(
    writer: ShardWriter, reader: CheckpointReader, spec: TensorSpec, module: ModuleAdapter, kind: AdapterKind
) -> torch.Tensor | None:
    """Ŵ of one module written as `spec`, a block of rows at a time from W0's mapped bytes (each block's pages
    given back once fused), so neither W0 nor Ŵ is ever whole in memory; returns its row scale (out, 1) or None.

    A transposed weight (a GPT-2 Conv1D, stored (in, out)) has its rows of Ŵ as columns of the file: it is
    read and fused whole.
    """
    dtype = SAFETENSORS_DTYPES[spec.dtype]
    if module.fan_in_fan_out:
        fused, row_scale = kind.fused_whole(reader.read(spec.name), module)  # fp32, stored layout
        writer.write(spec.name, _cast_fused(fused, dtype, module))
        return row_scale
    w0 = MappedTensor(reader.tensors[spec.name])  # (out, in), stored dtype
    scales: list[torch.Tensor | None] = []

    def blocks() -> Iterator[torch.Tensor]:
        for rows, fused, scale in kind.fused_rows(w0.view, module):  # (rows, in) fp32
            scales.append(scale)
            yield _cast_fused(fused, dtype, module)
            w0.drop_rows(rows)

    writer.write_rows(spec.name, blocks())
    return joined_row_scale(scales)


def _write_tensor(
    writer: ShardWriter, reader: CheckpointReader, spec: TensorSpec, module: ModuleAdapter | None, kind: AdapterKind
) -> None:
    stored = reader.tensors[spec.name].spec
    if module is not None:
        write_fused(writer, reader, spec, module, kind)
    elif stored == spec:
        writer.copy(spec.name, reader)
    else:
        writer.write(spec.name, reader.read(spec.name).to(SAFETENSORS_DTYPES[spec.dtype]))


def write_merged_shards(
    reader: CheckpointReader,
    kind: AdapterKind,
    bound: list[ModuleAdapter],
    out_dir: Path,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
    progress: bool | None,
) -> tuple[int, int]:
    """Stream every tensor into size-capped shards; returns (tensors, bytes)."""
    modules = {m.weight_key: m for m in bound}
    specs = [_output_spec(t.spec, dtype) for t in reader.tensors.values()]
    shards = plan_shards(specs, max_shard_bytes)
    left = Counter(layer_of(s.name) for s in specs)  # a layer is done when its last tensor is written
    with layer_bar("merge", len(left), progress) as bar:
        for i, shard in enumerate(shards):
            with ShardWriter(out_dir / shard_name(i, len(shards)), shard) as writer:
                for spec in shard:
                    _write_tensor(writer, reader, spec, modules.get(spec.name), kind)
                    layer = layer_of(spec.name)
                    left[layer] -= 1
                    if not left[layer]:
                        give_back_free_memory()
                        bar.update()
    write_index(out_dir, shards)
    return len(specs), sum(s.nbytes for s in specs)


def layer_bar(desc: str, layers: int, progress: bool | None) -> tqdm:
    """A progress bar counting layers; progress None: shown on a terminal only."""
    return tqdm(total=layers, unit="layer", desc=desc, disable=None if progress is None else not progress)


def check_float_targets(reader: CheckpointReader, bound: list[ModuleAdapter]) -> None:
    """Only floating-point base weights can be fused (quantized ones would be cast to garbage)."""
    for module in bound:
        stored = reader.tensors[module.weight_key].spec.dtype
        if not SAFETENSORS_DTYPES[stored].is_floating_point:
            raise MergeError(f"{module.path}: base weight is {stored}, not floating point; cannot fuse")


def _provenance(adapter: Adapter, adapter_path: Path, base_dir: Path, dtype: str) -> dict:
    return {
        "adapter": str(adapter_path),
        "base": str(base_dir),
        "kind": adapter.kind.name,
        "dtype": dtype,
        "modules": sorted(adapter.modules),
        "config": adapter.config.to_dict(),
    }


def merge(
    base_dir: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    threads: int | None = MERGE_THREADS,
) -> MergeResult:
    """Fuse the adapter into the base and write a standalone checkpoint at out_dir.

    `threads`: torch intra-op threads for the fusing maths (None keeps torch's setting).
    """
    start = time.perf_counter()
    check_threads(threads)
    base_dir, adapter_path, out_dir = Path(base_dir), Path(adapter_path), Path(out_dir)
    target_dtype = resolve_dtype(dtype)
    check_out_dir(out_dir)
    reader = CheckpointReader(base_dir)
    adapter = Adapter.load(adapter_path, limits)
    bound = adapter.bind(reader.shapes())  # every check before the output folder exists
    check_float_targets(reader, bound)
    try:
        with atomic_output_dir(out_dir) as tmp:
            with intra_op_threads(threads):
                tensors, nbytes = write_merged_shards(
                    reader, adapter.kind, bound, tmp, target_dtype, max_shard_bytes, progress
                )
            copy_side_files(base_dir, tmp, target_dtype)
            provenance = _provenance(adapter, adapter_path, base_dir, dtype)
            write_atomic(tmp / PROVENANCE_NAME, json.dumps(provenance, indent=2) + "\n")
    finally:
        reader.close()
    return MergeResult(out_dir, time.perf_counter() - start, len(adapter.modules), tensors, nbytes)


def fuse_into_file(
    base_dir: str | Path,
    adapter_path: str | Path,
    out_file: str | Path,
    dtype: str = "auto",
    limits: ArchiveLimits = DEFAULT_LIMITS,
    threads: int | None = MERGE_THREADS,
    on_form: Callable[[ModuleAdapter, RowScaledLowRank], None] | None = None,
) -> FuseResult:
    """Fuse the adapter into the base tensors it targets and write those alone into one safetensors file.

    The base is streamed (one tensor in memory at a time, in file order); out_file is replaced atomically
    (merger.fs), so a failure leaves it as it was.  dtype as for `merge`.  on_form: given each module's
    per-request form (AdapterKind.row_scaled) from the same row scale as its fused tensor.
    """
    start = time.perf_counter()
    check_threads(threads)
    target_dtype = resolve_dtype(dtype)
    with CheckpointReader(base_dir) as reader:
        adapter = Adapter.load(adapter_path, limits)
        bound = adapter.bind(reader.shapes())
        check_float_targets(reader, bound)
        stored = reader.tensors
        bound.sort(key=lambda m: (stored[m.weight_key].file, stored[m.weight_key].offset))
        specs = [_output_spec(stored[m.weight_key].spec, target_dtype) for m in bound]
        with (
            atomic_file(out_file) as tmp,
            ShardWriter(tmp, specs, exclusive=False) as writer,
            intra_op_threads(threads),
        ):
            for module, spec in giving_back(zip(bound, specs, strict=True)):
                row_scale = write_fused(writer, reader, spec, module, adapter.kind)
                if on_form is not None:
                    on_form(module, adapter.kind.row_scaled_form(module, row_scale))
    return FuseResult(Path(out_file), time.perf_counter() - start, len(bound), sum(s.nbytes for s in specs))
