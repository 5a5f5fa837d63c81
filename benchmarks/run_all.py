"""One command for the paper's deployment claims: run every benchmark, write RESULTS.md and the figures.

Each benchmark runs in its own interpreter and writes its JSON into
benchmarks/results/; with --reuse a benchmark whose JSON is already there is not
run again, so the page and figures can be redrawn in seconds.  The page is
benchmarks/RESULTS.md, the figures benchmarks/results/*.png.

    python -m benchmarks.run_all [--reuse] [--steps fidelity,throughput,merge_sizes]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import plots
from benchmarks.common import QUIET_ENV, REPO_ROOT
from benchmarks.results_page import render_page
from merger.fs import write_atomic

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PAGE = BENCH_DIR / "RESULTS.md"


@dataclasses.dataclass(frozen=True)
class Step:
    key: str
    args: tuple[str, ...]  # what run_all passes: sized for 2 cores shared with heavy other work (load ~15-20)
    timeout_s: int

    @property
    def module(self) -> str:
        return f"benchmarks.{self.key}"

    @property
    def json_path(self) -> Path:
        return RESULTS_DIR / f"{self.key}.json"


STEPS = (
    Step("fidelity", ("--items", "64", "--batch-size", "8"), 1800),
    Step(
        "throughput",
        (
            "--dtype",
            "bfloat16",
            "--rounds",
            "2",
            "--items-b1",
            "8",
            "--items-b16",
            "32",
            "--new-tokens",
            "16",
            "--swaps",
            "20",
        ),
        1800,
    ),
    Step("merge_sizes", ("--rounds", "2"), 1200),
)
FIGURES = {  # figure file -> (step whose JSON it draws, drawing function)
    "throughput.png": ("throughput", plots.throughput_figure),
    "accuracy_gap.png": ("fidelity", plots.accuracy_gap_figure),
    "swap_latency.png": ("throughput", plots.swap_figure),
    "merge_sizes.png": ("merge_sizes", plots.merge_sizes_figure),
}


class StepFailed(RuntimeError):
    """A benchmark exited non-zero or wrote no result."""


def run_step(step: Step) -> float:
    """Run one benchmark in a fresh interpreter (output streamed); its wall seconds."""
    command = [sys.executable, "-m", step.module, *step.args]
    print(f"$ {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **QUIET_ENV}, timeout=step.timeout_s)
    if done.returncode != 0 or not step.json_path.is_file():
        raise StepFailed(f"{step.module} exited with {done.returncode}")
    return time.perf_counter() - start


def load_results(steps: list[Step]) -> dict[str, dict]:
    missing = [str(s.json_path) for s in steps if not s.json_path.is_file()]
    if missing:
        raise StepFailed(f"no result to draw from: {', '.join(missing)} (run without --reuse)")
    return {s.key: json.loads(s.json_path.read_text()) for s in steps}


def draw_figures(results: dict[str, dict]) -> list[Path]:
    return [draw(results[key], RESULTS_DIR / name) for name, (key, draw) in FIGURES.items() if key in results]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", action="store_true", help="keep a benchmark's existing JSON instead of rerunning it")
    parser.add_argument("--steps", default=",".join(s.key for s in STEPS), help="comma-separated benchmarks to include")
    args = parser.parse_args(argv)
    known = {s.key: s for s in STEPS}
    chosen = [k.strip() for k in args.steps.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in known]
    if unknown or not chosen:
        parser.error(f"--steps: {', '.join(unknown) or 'none given'} (choose from {', '.join(known)})")
    args.steps = [known[k] for k in chosen]
    args.command = "python -m benchmarks.run_all " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seconds = {}
    try:
        for step in args.steps:
            if not (args.reuse and step.json_path.is_file()):
                seconds[step.key] = run_step(step)
        results = load_results(args.steps)
    except (StepFailed, subprocess.TimeoutExpired) as err:
        sys.exit(f"run_all: {err}")
    figures = draw_figures(results)
    write_atomic(PAGE, render_page(results, {s.key: s.module for s in args.steps}, args.command, seconds))
    print(f"wrote {PAGE} and {', '.join(f.name for f in figures)}")


if __name__ == "__main__":
    main()
