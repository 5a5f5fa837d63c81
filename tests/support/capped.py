"""One function run in a fresh interpreter under an address-space cap (RLIMIT_AS), its result as JSON.

The cap is set before anything is imported, so it bounds everything the process maps: libraries,
heap, thread stacks and memory-mapped files alike.  The child reports its peak address space and
peak RSS (VmPeak, VmHWM) with the function's result.

Each thread's stack is as large as the stack limit the process starts with (glibc's default), so the
child starts with an 8 MiB limit whatever the caller's is: under a 64 MiB `ulimit -s`, torch's and
OpenMP's handful of threads alone would reserve a few hundred MiB of the cap.

    python -m tests.support.capped CAP_BYTES MODULE:FUNCTION KWARGS_JSON RESULT_PATH

is the child side; tests call `run_capped`.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# a shell lowers the soft stack limit before exec (not preexec_fn: the pytest process may have threads)
STACK_LIMITED = ("/bin/sh", "-c", 'ulimit -S -s 8192 2>/dev/null; exec "$@"', "capped")


@dataclasses.dataclass(frozen=True)
class CappedRun:
    returncode: int
    stderr: str
    result: object = None
    vm_peak_bytes: int = 0  # peak address space
    vm_hwm_bytes: int = 0  # peak resident set


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def run_capped(cap_bytes: int, target: str, kwargs: dict, timeout_s: float = 600, **env: str) -> CappedRun:
    with tempfile.TemporaryDirectory(prefix="capped-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [*STACK_LIMITED, sys.executable, "-m", "tests.support.capped", str(cap_bytes), target,
                   json.dumps(kwargs), str(result_path)]  # fmt: skip
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
            timeout=timeout_s,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not result_path.is_file():
            return CappedRun(done.returncode, done.stderr)
        return CappedRun(done.returncode, done.stderr, **json.loads(result_path.read_text()))


# jobs


def upload_stages(base: str, artifact: str, work_dir: str, dtype: str = "auto") -> dict:
    """The worker stages of an upload (service.merging: fuse, verify) on an adapter folder; its equivalence."""
    from merger.archive import DEFAULT_LIMITS
    from merger.checkpoint import checkpoint_shapes
    from service.merging import UploadWork, check_adapter, run_stages

    base_dir, artifact_dir = Path(base), Path(artifact)
    checked = check_adapter(artifact_dir, checkpoint_shapes(base_dir), base_dir.name, False, DEFAULT_LIMITS)
    work = UploadWork(base_dir, artifact_dir, Path(work_dir), checked, dtype, DEFAULT_LIMITS, None, "capped upload")
    return run_stages(work).equivalence


def load_whole(base: str) -> None:
    """transformers' own from_pretrained of the whole model."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _report_usage() -> None:
    """At exit, on stderr: what the process had mapped and how many threads it ran (a failed run's clue)."""
    fields = ("VmPeak", "VmSize", "VmHWM", "Threads")
    lines = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(fields)]
    print("capped child at exit:", "; ".join(" ".join(line.split()) for line in lines), file=sys.stderr)


def _child(cap_bytes: int, target: str, kwargs_json: str, result_path: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    atexit.register(_report_usage)  # also runs when a library calls exit(), as libgomp does when out of threads
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(kwargs_json))
    record = {"result": result, "vm_peak_bytes": status_bytes("VmPeak"), "vm_hwm_bytes": status_bytes("VmHWM")}
    Path(result_path).write_text(json.dumps(record))


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
