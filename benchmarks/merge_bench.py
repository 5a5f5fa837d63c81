"""Merge benchmark: our streaming merge vs a plain shard copy vs PEFT merge_and_unload.

On a synthetic Llama-shaped fp32 checkpoint (≥ 2 GB, several shards, built once
into benchmarks/.work/ and reused), each method runs in a fresh interpreter
(benchmarks.common.run_job) that reports its own wall time and peak RSS:

    copy        safetensors load_file + save_file, shard by shard (the I/O floor)
    ours-d2lora merger.merge.merge of a D²-LoRA adapter, r=16 on q/k/v/o
    peft-dora   PEFT: load the model, PeftModel, merge_and_unload, save_pretrained
    ours-dora   merger.merge.merge of the same DoRA adapter (like with like)

Every method runs once untimed to warm the page cache (the base is then read
from memory by all of them alike), then `--rounds` interleaved rounds; the
table shows medians.  Dirty pages are synced between jobs and every output is
deleted right after its run.  Finally the DoRA outputs of PEFT and of our merge
are compared tensor by tensor.

    python -m benchmarks.merge_bench [--rounds 3] [--layers 10] [--drop-base]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import (
    MIB,
    Measurement,
    dir_bytes,
    flush_writes,
    machine_load,
    markdown_table,
    median_measurement,
    run_job,
)
from merger.checkpoint import INDEX_NAME, CheckpointReader, TensorSpec, plan_shards, shard_name, write_index
from merger.fs import write_atomic
from merger.merge import merge

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / ".work"
RESULTS_PATH = BENCH_DIR / "results" / "merge.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TIME_TARGET = 1.5  # merge wall time ÷ plain copy
RSS_TARGET = 0.25  # peak RSS ÷ checkpoint bytes
BUILT_STAMP = "bench_base.json"
JOB_MODULE = "benchmarks.merge_bench"  # not __name__: that is "__main__" under python -m


@dataclasses.dataclass(frozen=True)
class BaseShape:
    """A Llama-shaped model; the defaults give a 2.58 GB fp32 checkpoint in 6 shards."""

    layers: int = 10
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    vocab: int = 32000
    shard_bytes: int = 512 * MIB

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name}: must be a positive integer, got {getattr(self, field.name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden: {self.hidden} is not divisible by heads={self.heads}")

    @property
    def tag(self) -> str:
        return f"llama-h{self.hidden}-i{self.intermediate}-l{self.layers}-v{self.vocab}"

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            vocab_size=self.vocab,
            tie_word_embeddings=False,
            dtype="float32",
        )


def state_dict_specs(shape: BaseShape) -> list[TensorSpec]:
    """The fp32 tensor names and shapes of the model, taken from transformers itself (on meta)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape.llama_config())
    return [TensorSpec(name, "F32", tuple(t.shape)) for name, t in model.state_dict().items()]


def synthetic_tensor(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """Norm weights are ones, everything else N(0, 0.02²)."""
    if len(spec.shape) == 1:
        return torch.ones(spec.shape)
    return torch.randn(spec.shape, generator=gen) * 0.02


def build_base(base_dir: Path, shape: BaseShape) -> Path:
    """Write the synthetic checkpoint once (shard by shard, atomically); reuse it afterwards."""
    if (base_dir / BUILT_STAMP).is_file():
        return base_dir
    tmp = base_dir.with_name(base_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = plan_shards(state_dict_specs(shape), shape.shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        tensors = {spec.name: synthetic_tensor(spec, gen) for spec in shard}
        save_file(tensors, tmp / shard_name(i, len(shards)), metadata={"format": "pt"})
    write_index(tmp, shards)
    shape.llama_config().save_pretrained(tmp)
    (tmp / BUILT_STAMP).write_text(json.dumps(dataclasses.asdict(shape)) + "\n")
    shutil.rmtree(base_dir, ignore_errors=True)
    tmp.rename(base_dir)
    return base_dir


def write_adapters(work_dir: Path, base_dir: Path, r: int) -> dict[str, Path]:
    """One D²-LoRA and one PEFT DoRA adapter of rank r on q/k/v/o, alpha = 2r (reused if present)."""
    from tests.support.adapters import write_random_adapter

    adapters = {}
    for kind in ("D2LORA", "DORA"):
        path = work_dir / f"adapter-{kind.lower()}-r{r}-{base_dir.name}"
        if not (path / "adapter_model.safetensors").is_file():
            write_random_adapter(path, base_dir, kind=kind, r=r, alpha=2 * r, targets=TARGETS, seed=1)
        adapters[kind] = path
    return adapters


# The jobs, each run in a fresh interpreter by benchmarks.common.run_job.


def plain_copy(base: str, out: str, adapter: str | None = None) -> None:
    """The I/O floor: every shard loaded whole and saved again, plus the index."""
    base_dir, out_dir = Path(base), Path(out)
    out_dir.mkdir(parents=True)
    for shard in sorted(base_dir.glob("*.safetensors")):
        save_file(load_file(shard), out_dir / shard.name, metadata={"format": "pt"})
    shutil.copy2(base_dir / INDEX_NAME, out_dir / INDEX_NAME)


def our_merge(base: str, out: str, adapter: str) -> dict:
    result = merge(base, adapter, out, progress=False)
    return {"fused_modules": result.fused_modules, "tensors": result.tensors}


def peft_merge(base: str, out: str, adapter: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


@dataclasses.dataclass(frozen=True)
class Method:
    key: str
    label: str
    job: str  # module:function for run_job
    adapter: str | None  # "D2LORA" | "DORA" | None
    preload: tuple[str, ...] = ()
    is_ours: bool = False


METHODS = (
    Method("copy", "plain copy: `load_file` + `save_file` per shard", f"{JOB_MODULE}:plain_copy", None),
    Method("ours-d2lora", "**d2lora merge**, D²-LoRA r=16 q/k/v/o", f"{JOB_MODULE}:our_merge", "D2LORA", is_ours=True),
    Method(
        "peft-dora",
        "PEFT `merge_and_unload` + `save_pretrained`, DoRA r=16",
        f"{JOB_MODULE}:peft_merge",
        "DORA",
        preload=("transformers", "peft", "transformers.models.llama.modeling_llama"),
    ),
    Method("ours-dora", "**d2lora merge**, same DoRA r=16", f"{JOB_MODULE}:our_merge", "DORA", is_ours=True),
)
COMPARED = ("peft-dora", "ours-dora")  # outputs compared tensor by tensor after the last round


def run_method(method: Method, base: Path, adapters: dict[str, Path], out: Path) -> Measurement:
    shutil.rmtree(out, ignore_errors=True)
    flush_writes()
    kwargs = {"base": str(base), "out": str(out), "adapter": str(adapters[method.adapter]) if method.adapter else None}
    return run_job(method.job, kwargs, preload=method.preload)


def measure_all(
    methods: list[Method], base: Path, adapters: dict[str, Path], work_dir: Path, rounds: int
) -> dict[str, list[Measurement]]:
    """One untimed warm-up per method, then `rounds` interleaved rounds; outputs deleted after each run."""
    runs: dict[str, list[Measurement]] = {m.key: [] for m in methods}
    for round_index in range(rounds + 1):
        for method in methods:
            out = work_dir / f"out-{method.key}"
            measurement = run_method(method, base, adapters, out)
            if round_index > 0:
                runs[method.key].append(measurement)
            print(
                f"round {round_index}{' (warm-up)' if round_index == 0 else ''} {method.key}: "
                f"{measurement.seconds:.2f} s, peak RSS {measurement.peak_rss_bytes / MIB:.0f} MiB",
                flush=True,
            )
            if round_index < rounds or method.key not in COMPARED:
                shutil.rmtree(out, ignore_errors=True)
    return runs


def compare_checkpoints(dir_a: Path, dir_b: Path) -> dict | None:
    """Max |a − b| over every tensor of two checkpoints, and how many are bit-identical (None if one is missing)."""
    if not (dir_a.is_dir() and dir_b.is_dir()):
        return None
    a, b = CheckpointReader(dir_a), CheckpointReader(dir_b)
    if set(a.tensors) != set(b.tensors):
        raise ValueError(f"tensor names differ: {sorted(set(a.tensors) ^ set(b.tensors))[:5]}")
    max_diff, identical = 0.0, 0
    try:
        for name in sorted(a.tensors):
            ta, tb = a.read(name), b.read(name)  # (stored shape)
            identical += bool(torch.equal(ta, tb))
            max_diff = max(max_diff, (ta.double() - tb.double()).abs().max().item())
    finally:
        a.close()
        b.close()
    return {"max_abs_diff": max_diff, "tensors": len(a.tensors), "identical": identical}


def table_rows(medians: dict[str, Measurement], checkpoint_bytes: int) -> list[list[str]]:
    floor = medians["copy"].seconds
    rows = []
    for method in (m for m in METHODS if m.key in medians):
        m = medians[method.key]
        ratio, share = m.seconds / floor, m.peak_rss_bytes / checkpoint_bytes
        rows.append(
            [
                method.label,
                f"{m.seconds:.2f}",
                f"{ratio:.2f}",
                f"{m.peak_rss_bytes / MIB:.0f}",
                f"{100 * share:.0f}%",
                f"{m.baseline_rss_bytes / MIB:.0f}",
            ]
        )
    return rows


def verdicts(medians: dict[str, Measurement], checkpoint_bytes: int) -> list[str]:
    floor = medians["copy"].seconds
    lines = []
    for method in (m for m in METHODS if m.is_ours and m.key in medians):
        m = medians[method.key]
        time_ok = m.seconds / floor <= TIME_TARGET
        rss_ok = m.peak_rss_bytes / checkpoint_bytes <= RSS_TARGET
        lines.append(
            f"- {method.key}: time ≤ {TIME_TARGET}× copy {'met' if time_ok else 'MISSED'}, "
            f"peak RSS ≤ {RSS_TARGET:.0%} of checkpoint {'met' if rss_ok else 'MISSED'}"
        )
    return lines


def comparison_line(comparison: dict | None) -> str:
    if comparison is None:
        return "DoRA output, ours vs PEFT: not compared (both methods must run)."
    return (
        f"DoRA output, ours vs PEFT: max abs diff {comparison['max_abs_diff']:.3g} over "
        f"{comparison['tensors']} tensors ({comparison['identical']} bit-identical)."
    )


def render(
    medians: dict[str, Measurement],
    base: Path,
    shape: BaseShape,
    rounds: int,
    loads: list[str],
    comparison: dict,
    command: str,
) -> str:
    checkpoint_bytes = dir_bytes(base, "*.safetensors")
    shards = len(list(base.glob("*.safetensors")))
    headers = [
        "method",
        "wall s (median)",
        "÷ plain copy",
        "peak RSS MiB",
        "RSS % of checkpoint",
        "of which imports MiB",
    ]
    return "\n".join(
        [
            "# Merge benchmark",
            "",
            f"Synthetic Llama-shaped fp32 checkpoint `{shape.tag}`: {checkpoint_bytes / 1e9:.2f} GB "
            f"({checkpoint_bytes / MIB:.0f} MiB) in {shards} shards. Each method ran in a fresh subprocess "
            f"reporting its own peak RSS (VmHWM, read at exit); one untimed warm-up each (page cache warm for all), "
            f"then medians of "
            f"{rounds} interleaved rounds. Wall time is the job alone (library imports excluded); peak RSS is the "
            f"whole process, imports included (last column). Our merge fsyncs every shard before its atomic rename; "
            f"the plain copy and PEFT do not (their dirty pages are flushed, untimed, before the next job).",
            "",
            markdown_table(headers, table_rows(medians, checkpoint_bytes)),
            "",
            f"Targets (ours): merge time ≤ {TIME_TARGET}× the plain copy, "
            f"peak RSS ≤ {RSS_TARGET:.0%} of the checkpoint.",
            *verdicts(medians, checkpoint_bytes),
            "",
            comparison_line(comparison),
            "",
            f"Machine: 2 shared CPU cores, taken under load from other work ({loads[0]} at start, {loads[1]} at end); "
            f"{datetime.date.today().isoformat()}.",
            f"Command: `{command}`",
            "",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (median reported)")
    parser.add_argument("--layers", type=int, default=BaseShape.layers, help="decoder layers of the synthetic base")
    parser.add_argument("--hidden", type=int, default=BaseShape.hidden, help="hidden size of the synthetic base")
    parser.add_argument("--intermediate", type=int, default=BaseShape.intermediate, help="MLP size")
    parser.add_argument("--vocab", type=int, default=BaseShape.vocab, help="vocabulary size")
    parser.add_argument(
        "--methods",
        default=",".join(m.key for m in METHODS),
        help="comma-separated subset of: " + ", ".join(m.key for m in METHODS) + " (copy is required)",
    )
    parser.add_argument("--r", type=int, default=16, help="adapter rank")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="where the base and outputs go")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="markdown file for the table")
    parser.add_argument("--drop-base", action="store_true", help="delete the synthetic base and adapters at the end")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: must be at least 1, got {args.rounds}")
    known = {m.key: m for m in METHODS}
    chosen = [key.strip() for key in args.methods.split(",") if key.strip()]
    unknown = [key for key in chosen if key not in known]
    if unknown or "copy" not in chosen:
        parser.error(f"--methods: {', '.join(unknown) or 'copy is missing'} (choose from {', '.join(known)})")
    args.methods = [known[key] for key in chosen]
    return args


def main(argv: list[str] | None = None) -> None:
    import sys

    args = parse_args(argv)
    command = "python -m benchmarks.merge_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    shape = BaseShape(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab)
    base = build_base(args.work_dir / f"base-{shape.tag}", shape)
    adapters = write_adapters(args.work_dir, base, args.r)
    loads = [machine_load()]
    runs = measure_all(args.methods, base, adapters, args.work_dir, args.rounds)
    loads.append(machine_load())
    outputs = [args.work_dir / f"out-{key}" for key in COMPARED]
    comparison = compare_checkpoints(*outputs)
    for out in outputs:
        shutil.rmtree(out, ignore_errors=True)
    medians = {key: median_measurement(values) for key, values in runs.items()}
    report = render(medians, base, shape, args.rounds, loads, comparison, command.strip())
    print(report)
    write_atomic(args.results, report)
    if args.drop_base:
        for path in (base, *adapters.values()):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
