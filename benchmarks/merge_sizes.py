"""Merge time and peak memory vs model size, beside the plain-copy floor at each size.

Synthetic Llama-shaped fp32 checkpoints of a few sizes (benchmarks.merge_bench
builds them once into benchmarks/.work/ and writes a D²-LoRA r=16 q/k/v/o
adapter for each); each merge and each plain copy runs in a fresh interpreter
(benchmarks.common.run_job) reporting its own wall time and peak RSS.  One
untimed warm-up per size and method, then the median of --rounds.  Writes
benchmarks/results/merge_sizes.json.

    python -m benchmarks.merge_sizes [--rounds 2] [--sizes small,medium,large] [--drop-bases]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.common import (
    command_line,
    dir_bytes,
    flush_writes,
    median_measurement,
    pick,
    require_positive,
    run_job,
)
from benchmarks.machine import machine_info
from benchmarks.merge_bench import (
    JOB_MODULE,
    WORK_DIR,
    BaseShape,
    build_base,
    write_adapters,
)
from merger.fs import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPES = {  # fp32 checkpoint sizes: ~85 MB, ~440 MB, ~1.3 GB
    "small": BaseShape(layers=4, hidden=512, intermediate=1408, heads=8, vocab=8000, shard_bytes=256 << 20),
    "medium": BaseShape(layers=6, hidden=1024, intermediate=2816, heads=16, vocab=16000, shard_bytes=256 << 20),
    "large": BaseShape(layers=8, hidden=1536, intermediate=4096, heads=24, vocab=32000, shard_bytes=512 << 20),
}
JOBS = {"copy": f"{JOB_MODULE}:plain_copy", "merge": f"{JOB_MODULE}:our_merge"}
RANK = 16


def run_once(job: str, base: Path, adapter: Path, out: Path):
    shutil.rmtree(out, ignore_errors=True)
    flush_writes()
    try:
        return run_job(job, {"base": str(base), "out": str(out), "adapter": str(adapter)})
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure_size(shape: BaseShape, rounds: int, work_dir: Path) -> dict:
    base = build_base(work_dir / f"base-{shape.tag}", shape)
    adapter = write_adapters(work_dir, base, RANK)["D2LORA"]
    runs = {key: [] for key in JOBS}
    for index in range(rounds + 1):  # round 0 is the untimed warm-up
        for key, job in JOBS.items():
            measurement = run_once(job, base, adapter, work_dir / f"out-sizes-{key}")
            if index:
                runs[key].append(measurement)
    medians = {key: median_measurement(values) for key, values in runs.items()}
    return {
        "tag": shape.tag,
        "checkpoint_bytes": dir_bytes(base, "*.safetensors"),
        **{f"{key}_s": m.seconds for key, m in medians.items()},
        **{f"{key}_peak_rss_bytes": m.peak_rss_bytes for key, m in medians.items()},
        "import_rss_bytes": medians["merge"].baseline_rss_bytes,
        "base": str(base),
        "adapter": str(adapter),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per size after the warm-up")
    parser.add_argument("--sizes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="where the synthetic bases go")
    parser.add_argument("--drop-bases", action="store_true", help="delete the synthetic bases and adapters at the end")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "merge_sizes.json", help="where the result goes")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("rounds",))
    args.sizes = pick(parser, "--sizes", args.sizes, SHAPES)
    args.command = command_line("benchmarks.merge_sizes", argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    record = {"machine": machine_info(), "command": args.command, "rounds": args.rounds, "rank": RANK, "sizes": []}
    for name in args.sizes:
        row = measure_size(SHAPES[name], args.rounds, args.work_dir)
        print(
            f"{name}: {row['checkpoint_bytes'] / 1e9:.2f} GB  merge {row['merge_s']:.2f} s  copy {row['copy_s']:.2f} s",
            flush=True,
        )
        record["sizes"].append({"name": name, **row})
        if args.drop_bases:
            shutil.rmtree(row["base"], ignore_errors=True)
            shutil.rmtree(row["adapter"], ignore_errors=True)
    record["load_average_end"] = machine_info()["load_average"]
    write_atomic(args.json, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
