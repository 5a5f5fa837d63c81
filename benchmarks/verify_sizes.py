"""Merge, verify and upload at real model sizes: wall time and peak RSS, side by side per checkpoint.

Random Llama checkpoints (tests.support.random_llama: ~0.5B, 1B and 3B parameters, fp32 and bf16,
32k vocabulary, grouped-query attention, 2 GB shards) are built once under --work-dir and reused,
with a D²-LoRA r=8 adapter on q/k/v/o.  For each one, in this order:

    cp        `cp -r` of the checkpoint folder (wall time only)
    merge     `d2lora merge` in a fresh interpreter (benchmarks.common.run_job: wall from before the
              CLI's imports, peak RSS = the child's VmHWM at exit)
    verify    `d2lora verify --merged` of that merge, measured the same way
    upload    `POST /adapters?wait=true` to a live `d2lora serve --engine transformers` (engine in
              bfloat16; the fused tensors keep the base's dtype), twice: on a bf16 base the first, to a
              fresh data dir, computes the dtype floor and the second (the same adapter under another
              name) reads it from the data dir's cache, as every later upload for that base does (an
              fp32 upload has no floor: its second is a repeat); wall = the request, peak RSS = the
              server's VmHWM during it, reset to its RSS just before (/proc/PID/clear_refs) minus that
              RSS: what the upload adds to a server that already holds its engine

Targets (issue 13): verify ≤ 4× merge; verify and upload peak RSS ≤ 25% of the checkpoint at 1B and
within 20% from 1B to 3B; an upload ≤ 3× the merge.  Rows are kept in --json and the table in --md
is written from every row there, so sizes may be run in separate invocations.

    python -m benchmarks.verify_sizes [--sizes 0.5B,1B] [--dtypes float32,bfloat16] [--omp-passive] [--drop]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import MIB, command_line, dir_bytes, flush_writes, markdown_table, pick, run_job
from benchmarks.machine import machine_info
from merger.fs import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path("/work/scratch/verify")
SIZES = ("0.5B", "1B", "3B")
DTYPES = ("float32", "bfloat16")
JOB_MODULE = "benchmarks.verify_sizes"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# jobs, each in a fresh interpreter (benchmarks.common.run_job)


def cli(argv: list[str]) -> dict:
    """`d2lora ARGV...`, imports included in the time; its exit code and CPU seconds (all threads)."""
    import resource

    from service.cli import main

    code = main(argv)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"exit": code, "cpu_s": usage.ru_utime + usage.ru_stime}


def imports_only() -> None:
    """What torch + transformers' Llama cost before any work (VmHWM of this job)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  # the import is the measurement


def build_inputs(folder: str, adapter: str, size: str, dtype: str) -> None:
    import torch

    from tests.support.adapters import write_random_adapter
    from tests.support.random_llama import SHAPES, build

    base = build(Path(folder), SHAPES[size], getattr(torch, dtype))
    if not (Path(adapter) / "adapter_model.safetensors").is_file():
        write_random_adapter(adapter, base, "D2LORA", r=8, alpha=16, targets=list(TARGETS), seed=1, relative_size=0.05)


# the measurements


def measure_cp(base: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    flush_writes()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(base), str(out)], check=True)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def measure_cli(argv: list[str]) -> dict:
    flush_writes()
    m = run_job(f"{JOB_MODULE}:cli", {"argv": argv}, timeout=7200)
    if m.result["exit"] not in (0, 1):
        raise RuntimeError(f"d2lora {argv[0]} exited with {m.result['exit']}")
    return {"seconds": m.seconds, "peak_rss_bytes": m.peak_rss_bytes, **m.result}


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def timed_upload(server, name: str, adapter: Path) -> dict:
    """One upload: wall, the server's CPU seconds, and the RSS it adds (VmHWM reset to VmRSS just before)."""
    from tests.support.uploading import upload_files

    assert server.process is not None
    pid = server.process.pid
    rss_before = _status_kib(pid, "VmRSS") * 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    start, cpu_start = time.perf_counter(), _cpu_seconds(pid)
    response = upload_files(server, name, adapter)
    seconds, cpu_s = time.perf_counter() - start, _cpu_seconds(pid) - cpu_start
    peak = _status_kib(pid, "VmHWM") * 1024
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "status": response.status_code,
        "server_rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "added_rss_bytes": peak - rss_before,
        "stages": [line.split(": ", 2)[-1] for line in server.log_tail(200).splitlines() if f"adapter {name}" in line],
        "passed": response.status_code == 201 and response.json()["equivalence"]["passed"],
    }


def measure_uploads(base: Path, adapter: Path, work: Path) -> tuple[dict, dict]:
    """The first upload to a fresh server (a bf16 one computes the dtype floor) and a second (the floor cached)."""
    from tests.support.live import LiveServer

    data_dir, logs = work / "upload-data", work / "upload-logs"
    for folder in (data_dir, logs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    server = LiveServer(base, data_dir, logs, engine="transformers", D2LORA_DTYPE="bfloat16")
    server.start()
    try:
        return timed_upload(server, "bench", adapter), timed_upload(server, "bench-again", adapter)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def measure_row(size: str, dtype: str, work: Path) -> dict:
    base, adapter = work / f"llama-{size}-{dtype}", work / f"adapter-{size}-{dtype}"
    run_job(f"{JOB_MODULE}:build_inputs", {"folder": str(base), "adapter": str(adapter), "size": size, "dtype": dtype},
            timeout=7200)  # fmt: skip
    merged = work / f"merged-{size}-{dtype}"
    shutil.rmtree(merged, ignore_errors=True)
    row: dict = {"size": size, "dtype": dtype, "checkpoint_bytes": dir_bytes(base, "*.safetensors")}
    row["cp_s"] = measure_cp(base, work / f"copy-{size}-{dtype}")
    row["merge"] = measure_cli(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged)])
    try:
        row["verify"] = measure_cli(["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(merged)])
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    row["upload"], row["second_upload"] = measure_uploads(base, adapter, work)
    return row


# the table


def _share(value: int, row: dict) -> str:
    return f"{value / MIB:.0f} MiB ({100 * value / row['checkpoint_bytes']:.0f}%)"


def _upload_cell(upload: dict, row: dict) -> str:
    return f"{upload['seconds']:.1f} s, +{_share(upload['added_rss_bytes'], row)}" + (
        "" if upload["passed"] else " FAILED"
    )


def table(rows: list[dict], baseline_rss: int) -> str:
    headers = ["checkpoint", "cp -r", "merge", "verify --merged", "upload (POST)", "second upload (bf16: floor cached)",
               "verify ÷ merge", "upload ÷ merge (second)", "CPU s: merge / verify / upload", "load"]  # fmt: skip
    lines = []
    for r in rows:
        merge, verify, upload, second = r["merge"], r["verify"], r["upload"], r["second_upload"]
        verified = "" if verify["exit"] == 0 else " FAILED"
        lines.append([
            f"{r['size']} {r['dtype']}, {r['checkpoint_bytes'] / 1e9:.1f} GB",
            f"{r['cp_s']:.1f} s",
            f"{merge['seconds']:.1f} s, {_share(merge['peak_rss_bytes'], r)}",
            f"{verify['seconds']:.1f} s, {_share(verify['peak_rss_bytes'], r)}{verified}",
            _upload_cell(upload, r),
            _upload_cell(second, r),
            f"{verify['seconds'] / merge['seconds']:.2f}",
            f"{upload['seconds'] / merge['seconds']:.2f} ({second['seconds'] / merge['seconds']:.2f})",
            f"{merge['cpu_s']:.0f} / {verify['cpu_s']:.0f} / {upload['cpu_s']:.0f}",
            f"{r['load_average_end'][0]:.1f}",
        ])  # fmt: skip
    note = f"Peak RSS of a process that has only imported torch + transformers' Llama: {baseline_rss / MIB:.0f} MiB."
    return markdown_table(headers, lines) + "\n\n" + note


def write_results(record: dict, md_path: Path, json_path: Path) -> None:
    write_atomic(json_path, json.dumps(record, indent=2) + "\n")
    order = {(s, d): i for i, (s, d) in enumerate((s, d) for s in SIZES for d in DTYPES)}
    rows = sorted(record["rows"].values(), key=lambda r: order[r["size"], r["dtype"]])
    stages = [
        f"- {r['size']} {r['dtype']}: " + "; ".join(r[key]["stages"]) + suffix
        for r in rows
        for key, suffix in (("upload", ""), ("second_upload", " (second upload)"))
    ]
    text = "\n\n".join([
        "# Merge, verify and upload at real model sizes (issue 13)",
        f"`{record['command']}` (one invocation per set of rows; the latest per row is kept)",
        f"Machine: {record['machine']}",
        table(rows, record["imports_rss_bytes"]),
        "Upload stages as the server logged them (seconds):\n" + "\n".join(stages),
    ])  # fmt: skip
    write_atomic(md_path, text + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.5B,1B", help=f"comma-separated subset of {', '.join(SIZES)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {', '.join(DTYPES)}")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="where checkpoints are built and reused")
    parser.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for every child")
    parser.add_argument("--drop", action="store_true", help="delete each checkpoint and adapter after its row")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "verify_sizes.json")
    parser.add_argument("--md", type=Path, default=RESULTS_DIR / "verify_sizes.md")
    args = parser.parse_args(argv)
    args.sizes = pick(parser, "--sizes", args.sizes, SIZES)
    args.dtypes = pick(parser, "--dtypes", args.dtypes, DTYPES)
    args.command = command_line(JOB_MODULE, argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # children inherit it (run_job, the live server)
    record = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": {}}
    record.update(command=args.command, machine=machine_info())
    record["imports_rss_bytes"] = run_job(f"{JOB_MODULE}:imports_only", {}).peak_rss_bytes
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        for dtype in args.dtypes:
            row = measure_row(size, dtype, args.work_dir)
            row["load_average_end"] = os.getloadavg()
            record["rows"][f"{size}-{dtype}"] = row
            print(json.dumps(row), flush=True)
            write_results(record, args.md, args.json)
            if args.drop:
                for prefix in ("llama", "adapter"):
                    shutil.rmtree(args.work_dir / f"{prefix}-{size}-{dtype}", ignore_errors=True)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
