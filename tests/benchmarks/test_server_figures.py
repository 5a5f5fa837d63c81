"""The load test's memory figures tell a process that keeps growing from one that stays flat."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.server_figures import RssSampler, rss_summary

GROWING = "import time\nheld = []\nwhile True:\n    held.append(bytearray(8 << 20)); time.sleep(0.1)"
FLAT = "import time\nheld = bytearray(64 << 20)\nwhile True:\n    time.sleep(0.1)"


def sampled(program: str, seconds: float = 2.0) -> dict:
    process = subprocess.Popen([sys.executable, "-c", program])
    try:
        time.sleep(0.5)  # the interpreter is up and its first allocation made
        sampler = RssSampler(process.pid, every_s=0.2)
        sampler.start()
        time.sleep(seconds)
        return rss_summary(sampler.stop(), warm_up_s=0.4)
    finally:
        process.kill()
        process.wait()


def test_a_process_that_keeps_allocating_has_a_steep_slope_and_its_peak_at_the_end():
    figures = sampled(GROWING)
    assert figures["rss_slope_mib_per_min"] > 1000  # 8 MiB every 0.1 s is about 4800 MiB/min
    assert figures["rss_peak"] == figures["rss_end"] > figures["rss_after_warm_up"] + 50


def test_a_process_that_holds_its_memory_has_a_flat_slope():
    figures = sampled(FLAT)
    assert figures["rss_slope_mib_per_min"] == pytest.approx(0, abs=30)
    assert figures["rss_peak"] > 64
    assert figures["server_alone_slope_mib_per_min"] == pytest.approx(0, abs=30)
    assert len(figures["rss_samples"]) >= 8
