"""oneMKL's code path on x86 CPUs that are not Intel's: its AVX2 kernels instead of its generic ones.

torch's float32 matmuls on x86 are oneMKL's (F.linear is an SGEMM).  On a CPU whose vendor is not
GenuineIntel, MKL runs generic kernels unless its Conditional Numerical Reproducibility branch
(MKL_CBWR) names an instruction set the CPU has.  Here (AMD EPYC, 2 cores, AVX2), F.linear of a
streamed decode's shape, (8, 2048) by a (5632, 2048) weight, reads the weight at 4.8 GB/s by
default and at 8.4 GB/s with MKL_CBWR=AVX2; the teacher-forced pass's shape (363 rows) is about the
same either way; an upload's 1B fp32 verify takes 55 s instead of 68 (benchmarks/mkl_path.py).

MKL reads MKL_CBWR once, at its first call, so `prefer_avx2_kernels` runs first thing in the `d2lora`
entry point, before any model is built; processes it starts (an engine's) inherit it.  A value the
user set is kept; on an Intel CPU, one without AVX2 and FMA, or another architecture, nothing is set.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from merger import cpu

VARIABLE = "MKL_CBWR"
AVX2_BRANCH = "AVX2"
INTEL_VENDOR = "GenuineIntel"
NEEDED_FLAGS = frozenset({"avx2", "fma"})


def wants_avx2_branch(processor: dict[str, str]) -> bool:
    """An x86 CPU not made by Intel, with AVX2 and FMA (merger.cpu's fields): MKL's generic kernels would run on it."""
    return processor.get("vendor_id", "") not in ("", INTEL_VENDOR) and cpu.flags(processor) >= NEEDED_FLAGS


def cpu_wants_avx2_branch(cpuinfo: Path | None = None) -> bool:
    """`wants_avx2_branch` for this machine's CPU (/proc/cpuinfo by default); False when it cannot be read."""
    return wants_avx2_branch(cpu.processor(cpuinfo))


def prefer_avx2_kernels(environ: MutableMapping[str, str] | None = None, cpuinfo: Path | None = None) -> bool:
    """Set MKL_CBWR=AVX2 (in os.environ by default) where `cpu_wants_avx2_branch` and the user has not set it;
    whether it was set."""
    environ = os.environ if environ is None else environ
    if VARIABLE in environ or not cpu_wants_avx2_branch(cpuinfo):
        return False
    environ[VARIABLE] = AVX2_BRANCH
    return True
