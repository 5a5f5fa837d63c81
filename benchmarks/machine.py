"""Where and when a benchmark ran: the line every result and figure carries."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def ram_gib() -> float:
    """Total memory in GiB (MemTotal), 0 when it cannot be read."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)  # "MemTotal:  24576000 kB"
    return 0.0


def machine_info() -> dict:
    """nproc, CPU model, RAM, the load averages and today's date, as one JSON-ready record."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "ram_gib": round(ram_gib(), 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.date.today().isoformat(),
    }


def machine_line(info: dict) -> str:
    """'2 CPUs (AMD EPYC), 23.5 GiB RAM, load 11.3 at start, 2026-11-29' for captions."""
    return (
        f"{info['nproc']} CPUs ({info['cpu_model']}), {info['ram_gib']:.1f} GiB RAM, "
        f"1-min load {info['load_average'][0]:.1f} at start, {info['date']}"
    )
