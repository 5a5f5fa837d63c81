"""Helpers shared by the benchmarks: run one job in a fresh interpreter and measure it.

A job is `module:function` called with JSON keyword arguments in a new Python
process, so its peak RSS, read by the job itself at exit, is its own: nothing
one job allocates, maps or caches can leak into the next one's numbers.

Peak RSS is the kernel's high-water mark of the process's memory map (VmHWM).
`getrusage(RUSAGE_SELF).ru_maxrss` is not used on Linux because exec carries
the forking parent's high-water mark into it: a job started from a benchmark
that had imported torch and transformers reported 459 MiB before doing
anything, against 243 MiB when started from a shell.  Modules named in `preload` are imported before the clock
starts, so a job is not charged for importing its libraries; their memory is
reported separately as the baseline.

    python -m benchmarks.common MODULE:FUNCTION KWARGS_JSON RESULT_PATH [PRELOAD ...]

is the child side; benchmarks call `run_job` and never this directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from merger.fs import write_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class BenchmarkError(RuntimeError):
    """A benchmark job failed or produced no result."""


@dataclasses.dataclass(frozen=True)
class Measurement:
    seconds: float  # wall time of the function call alone (imports excluded)
    peak_rss_bytes: int  # the whole process at exit: interpreter, imports and the job
    baseline_rss_bytes: int  # peak RSS before the call: interpreter and preloaded imports
    result: Any = None  # what the function returned (JSON-serialisable)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: VmHWM on Linux, else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def run_job(target: str, kwargs: dict, preload: Sequence[str] = (), timeout: float = 1800) -> Measurement:
    """Call `module:function(**kwargs)` in a fresh interpreter; its wall time and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.common", target, json.dumps(kwargs), str(result_path), *preload]
        env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=timeout, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not result_path.is_file():
            tail = done.stderr.strip().splitlines()[-5:]
            raise BenchmarkError(f"{target} exited with {done.returncode}: " + " | ".join(tail))
        return Measurement(**json.loads(result_path.read_text()))


def _resolve(target: str):
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _child(target: str, kwargs_json: str, result_path: str, preload: Iterable[str]) -> None:
    for module in preload:
        importlib.import_module(module)
    function = _resolve(target)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    result = function(**json.loads(kwargs_json))
    seconds = time.perf_counter() - start
    record = {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline, "result": result}
    write_atomic(Path(result_path), json.dumps(record))


def median_measurement(runs: Sequence[Measurement]) -> Measurement:
    """Median wall time and median peak RSS of repeated runs of one job."""
    if not runs:
        raise BenchmarkError("no runs to summarise")
    return Measurement(
        seconds=statistics.median(m.seconds for m in runs),
        peak_rss_bytes=int(statistics.median(m.peak_rss_bytes for m in runs)),
        baseline_rss_bytes=int(statistics.median(m.baseline_rss_bytes for m in runs)),
        result=runs[-1].result,
    )


def flush_writes() -> None:
    """Write back dirty pages between jobs so one job's writes are not paid for by the next."""
    os.sync()


def machine_load() -> str:
    """The 1/5/15-minute load averages and the CPU count, for the record of a noisy run."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def dir_bytes(path: Path, pattern: str = "*") -> int:
    """Total size of the files in path matching pattern."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python -m benchmarks.common MODULE:FUNCTION KWARGS_JSON RESULT_PATH [PRELOAD ...]")
    _child(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]) -> None:
    """parser.error for the first integer option below 1, named as its flag."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")


def pick(parser: argparse.ArgumentParser, flag: str, text: str, known: Iterable[str]) -> list[str]:
    """A comma list whose every item is one of `known`; parser.error otherwise."""
    known = list(known)
    picked = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in picked if item not in known]
    if unknown or not picked:
        parser.error(f"{flag}: {', '.join(unknown) or 'none given'} (choose from {', '.join(known)})")
    return picked


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How this benchmark was invoked, for the results page."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
