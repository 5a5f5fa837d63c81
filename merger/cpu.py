"""What this machine's CPU is, from /proc/cpuinfo: its vendor and its instruction-set flags."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def first_processor(cpuinfo: str) -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo's text, e.g. {"vendor_id": "AuthenticAMD", ...}."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def processor(cpuinfo: Path | None = None) -> dict[str, str]:
    """`first_processor` of this machine (CPUINFO by default); {} when it cannot be read."""
    try:
        return first_processor((cpuinfo or CPUINFO).read_text())
    except OSError:
        return {}


def flags(fields: dict[str, str]) -> frozenset[str]:
    """A processor's instruction-set flags (x86's "flags" field; none on other architectures)."""
    return frozenset(fields.get("flags", "").split())
