"""MKL's default kernels against its AVX2 branch (merger.mkl), side by side, in fresh interpreters.

Each arm is a job of its own (benchmarks.common.run_job) that sets MKL_CBWR (or removes it) before
its first matmul, since MKL reads it once; the arms alternate, --rounds times, and the medians are kept:

    linear     F.linear at a streamed verify's two shapes over 12 float32 weights of (5632, 2048) (a 1B
               Llama's MLP, 554 MB, beyond the caches): 8 rows (a decode step) and 363 rows (the
               teacher-forced pass), best of 3
    verify     an upload's verify: the 1B fp32 random Llama of benchmarks.verify_sizes with its D²-LoRA
               adapter, the fused file over the base (merger.verify.verify(..., fused=...))

    python -m benchmarks.mkl_path [--rounds 2] [--skip-verify]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import command_line, markdown_table, require_positive, run_job
from benchmarks.machine import machine_info
from benchmarks.verify_sizes import JOB_MODULE as SIZES_MODULE
from benchmarks.verify_sizes import WORK_DIR
from merger import mkl
from merger.fs import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
JOB_MODULE = "benchmarks.mkl_path"
ARMS = {"default": None, "AVX2 branch": mkl.AVX2_BRANCH}  # the arm's MKL_CBWR (None: unset)
LINEAR_SHAPE = (5632, 2048)  # (out, in)
LINEAR_WEIGHTS = 12
ROWS = (8, 363)
SIZE, DTYPE = "1B", "float32"


def _choose(branch: str | None) -> None:
    """The arm's MKL_CBWR, before this process's first matmul."""
    os.environ.pop(mkl.VARIABLE, None)
    if branch is not None:
        os.environ[mkl.VARIABLE] = branch


def linear_rates(branch: str | None) -> dict:
    import torch
    import torch.nn.functional as F

    _choose(branch)
    weights = [torch.randn(LINEAR_SHAPE) for _ in range(LINEAR_WEIGHTS)]  # [(out, in)]
    weight_elements = sum(w.numel() for w in weights)
    weight_bytes = weight_elements * weights[0].element_size()
    rates = {}
    for rows in ROWS:
        x = torch.randn(rows, LINEAR_SHAPE[1])  # (rows, in)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            best = min(best, time.perf_counter() - start)
        rates[str(rows)] = {
            "gb_per_s": weight_bytes / best / 1e9,
            "gflop_per_s": 2 * rows * weight_elements / best / 1e9,
        }
    return rates


def fuse(base: str, adapter: str, fused: str) -> None:
    from merger.merge import fuse_into_file

    if not Path(fused).is_file():
        fuse_into_file(Path(base), Path(adapter), Path(fused), "auto")


def upload_verify(branch: str | None, base: str, adapter: str, fused: str) -> dict:
    from merger.verify import verify

    _choose(branch)
    start = time.perf_counter()
    report = verify(base, adapter, fused=fused, progress=False)
    return {"seconds": time.perf_counter() - start, "passed": report.passed}


def _median_rates(runs: list[dict]) -> dict:
    return {rows: {k: statistics.median(r[rows][k] for r in runs) for k in runs[0][rows]} for rows in runs[0]}


def measure(rounds: int, with_verify: bool) -> dict:
    paths = {name: str(WORK_DIR / f"{name}-{SIZE}-{DTYPE}") for name in ("llama", "adapter")}
    files = {  # the inputs of `fuse` and `upload_verify`
        "base": paths["llama"],
        "adapter": paths["adapter"],
        "fused": str(WORK_DIR / f"fused-{SIZE}-{DTYPE}.safetensors"),
    }
    if with_verify:
        inputs = {"folder": paths["llama"], "adapter": paths["adapter"], "size": SIZE, "dtype": DTYPE}
        run_job(f"{SIZES_MODULE}:build_inputs", inputs, timeout=7200)
        run_job(f"{JOB_MODULE}:fuse", files)
    runs: dict[str, dict[str, list]] = {arm: {"linear": [], "verify": []} for arm in ARMS}
    for _ in range(rounds):
        for arm, branch in ARMS.items():
            runs[arm]["linear"].append(run_job(f"{JOB_MODULE}:linear_rates", {"branch": branch}).result)
            if with_verify:
                kwargs = {"branch": branch, **files}
                runs[arm]["verify"].append(run_job(f"{JOB_MODULE}:upload_verify", kwargs, timeout=3600).result)
    return {
        arm: {
            "linear": _median_rates(r["linear"]),
            "verify_s": statistics.median(v["seconds"] for v in r["verify"]) if r["verify"] else None,
            "verify_runs_s": [v["seconds"] for v in r["verify"]],
            "passed": all(v["passed"] for v in r["verify"]),
        }
        for arm, r in runs.items()
    }


def table(arms: dict) -> str:
    headers = ["MKL", "F.linear, 8 rows", "F.linear, 363 rows", f"upload's verify, {SIZE} {DTYPE}"]
    lines = []
    for arm, m in arms.items():
        decode, forced = m["linear"]["8"], m["linear"]["363"]
        verify = "—" if m["verify_s"] is None else f"{m['verify_s']:.1f} s" + ("" if m["passed"] else " FAILED")
        lines.append([arm, f"{decode['gb_per_s']:.1f} GB/s", f"{forced['gflop_per_s']:.0f} GFLOP/s", verify])
    return markdown_table(headers, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times each arm runs, alternating (medians kept)")
    parser.add_argument("--skip-verify", action="store_true", help="only the F.linear rates")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "mkl_path.json")
    parser.add_argument("--md", type=Path, default=RESULTS_DIR / "mkl_path.md")
    args = parser.parse_args(argv)
    require_positive(parser, args, ["rounds"])
    machine = machine_info()
    applies = mkl.cpu_wants_avx2_branch()
    arms = measure(args.rounds, not args.skip_verify)
    record = {"command": command_line(JOB_MODULE, argv), "machine": machine, "d2lora_sets_it": applies, "arms": arms}
    write_atomic(args.json, json.dumps(record, indent=2) + "\n")
    text = "\n\n".join([
        "# MKL's default kernels against its AVX2 branch (merger.mkl)",
        f"`{record['command']}`",
        f"Machine: {machine}; `d2lora` sets MKL_CBWR=AVX2 on this CPU: {'yes' if applies else 'no'}",
        table(arms),
    ])  # fmt: skip
    write_atomic(args.md, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
