"""The figures of benchmarks/RESULTS.md, drawn from the benchmarks' JSON results (matplotlib, Agg).

Every figure carries, under its title, the command that produced its data, the
machine (CPUs, CPU model, RAM, load) and the date.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.machine import machine_line  # noqa: E402
from merger.fs import save_atomic  # noqa: E402

PATH_LABELS = {
    "unmerged-recompute": "unmerged,\nnorm recomputed",
    "unmerged-cached": "unmerged,\nscale cached",
    "merged-hf": "merged,\ntransformers",
    "merged-vllm": "merged,\nvLLM",
}
GAP_VARIANTS = ("merged-fp32", "merged-bf16", "naive-bf16")


def provenance(record: dict) -> str:
    return f"{record['command']}\n{machine_line(record['machine'])}"


def save(fig, path: Path, record: dict) -> Path:
    """Stamp the provenance footer, write via a temporary file, close the figure."""
    fig.text(0.01, 0.01, provenance(record), fontsize=7, family="monospace", va="bottom", color="0.3")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], fmt: str) -> None:
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[format(v, fmt) for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


def throughput_figure(record: dict, path: Path) -> Path:
    medians = record["medians"]
    paths = [p for p in PATH_LABELS if p in medians]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    keys = ("items_per_s", "tokens_per_s")
    units = ("items/s (multiple-choice scoring)", "generated tokens/s (greedy)")
    for ax, key, unit in zip(axes, keys, units, strict=True):
        series = {f"batch {b}": [medians[p][b][key] for p in paths] for b in ("1", "16")}
        _grouped_bars(ax, [PATH_LABELS[p] for p in paths], series, ".1f")
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Evaluation throughput, demo model {record['dtype']}, adapter {record['task']} "
        f"(median over {record['rounds']} round(s), paths interleaved)"
    )
    return save(fig, path, record)


def accuracy_gap_figure(record: dict, path: Path) -> Path:
    tasks = list(record["tasks"])
    fig, (gap_ax, logit_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    rows = {t: record["tasks"][t]["variants"] for t in tasks}
    labels = [f"{t}\n({record['tasks'][t]['items']} items)" for t in tasks]
    _grouped_bars(gap_ax, labels, {v: [rows[t][v]["gap_points"] for t in tasks] for v in GAP_VARIANTS}, "+.2f")
    gap_ax.axhline(0, color="0.5", linewidth=0.8)
    gap_ax.set_ylabel("accuracy − unmerged of the same dtype (points)")
    gap_ax.legend(fontsize=8)
    variants = [v for v in rows[tasks[0]] if v != "unmerged-fp32"]
    _grouped_bars(logit_ax, labels, {v: [rows[t][v]["max_abs_logit_diff"] for t in tasks] for v in variants}, ".1e")
    logit_ax.set_yscale("log")
    logit_ax.set_ylabel("max |Δlogit| vs unmerged fp32")
    logit_ax.legend(fontsize=7)
    fig.suptitle("Merged vs unmerged: accuracy gap per task, and logit error against the fp32 unmerged reference")
    return save(fig, path, record)


def swap_figure(record: dict, path: Path) -> Path:
    swaps_ms = [1e3 * s for s in record["swap_s"]]
    copy_ms = sorted(1e3 * s for s in record["copy_s"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(swaps_ms, bins=min(20, len(swaps_ms)), color="tab:blue", alpha=0.8, label="swap (plan + load_weights)")
    ax.axvline(
        copy_ms[len(copy_ms) // 2],
        color="tab:red",
        linestyle="--",
        label=f"in-memory copy of the same {record['swap_bytes'] / 1e6:.0f} MB (median)",
    )
    ax.set_xlabel("ms")
    ax.set_ylabel("swaps")
    ax.legend(fontsize=8)
    fig.suptitle(f"Hot-swap latency on the vLLM engine ({len(swaps_ms)} swaps, {record['dtype']})")
    return save(fig, path, record)


def merge_sizes_figure(record: dict, path: Path) -> Path:
    sizes = record["sizes"]
    gb = [s["checkpoint_bytes"] / 1e9 for s in sizes]
    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, label in (("merge", "d2lora merge (D²-LoRA r=16, q/k/v/o)"), ("copy", "plain copy (I/O floor)")):
        time_ax.plot(gb, [s[f"{key}_s"] for s in sizes], marker="o", label=label)
        rss_ax.plot(gb, [s[f"{key}_peak_rss_bytes"] / 2**20 for s in sizes], marker="o", label=label)
    rss_ax.plot(gb, [g * 1e9 / 2**20 for g in gb], color="0.6", linestyle=":", label="checkpoint size")
    time_ax.set(xlabel="fp32 checkpoint GB", ylabel="wall s (median)")
    rss_ax.set(xlabel="fp32 checkpoint GB", ylabel="peak RSS MiB (imports included)")
    for ax in (time_ax, rss_ax):
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Merge time and memory vs model size (synthetic Llama-shaped checkpoints, median of {record['rounds']})"
    )
    return save(fig, path, record)
