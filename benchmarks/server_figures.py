"""What the load test reads from the server itself: its memory over time, and its own request-latency histogram.

RSS is the server process's plus its children's (vLLM's engine core), sampled
every few seconds by a thread, with the server process's own share beside it
(so a growth can be told apart: the HTTP side or the engine); whether memory
is flat after warm-up is the least-squares slope of the totals taken after it.  The server-side latency of
a burst comes from `d2lora_request_latency_seconds` (SPEC §5), read before and
after: the histogram's buckets bound it from above.
"""

from __future__ import annotations

import math
import statistics
import threading
import time

import httpx
import psutil

INFERENCE_ROUTES = ('endpoint="/v1/completions"', 'endpoint="/v1/chat/completions"')


def rss_mib(pid: int) -> tuple[float, float]:
    """(the process and its children, the process alone), resident."""
    process = psutil.Process(pid)
    alone = process.memory_info().rss
    children = sum(p.memory_info().rss for p in process.children(recursive=True))
    return (alone + children) / (1 << 20), alone / (1 << 20)


class RssSampler:
    """(seconds since start, MiB with children, MiB alone) every `every_s` s on a thread, `start()` to `stop()`."""

    def __init__(self, pid: int, every_s: float):
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float, float]] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread.start()

    def stop(self) -> list[tuple[float, float, float]]:
        """Stop, take one last sample (the end), and return them all."""
        self._stopped.set()
        self._thread.join()
        self._sample()
        return self.samples

    def _run(self) -> None:
        self._sample()
        while not self._stopped.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        total, alone = rss_mib(self.pid)
        self.samples.append((round(time.monotonic() - self._began, 1), round(total, 1), round(alone, 1)))


def rss_summary(samples: list[tuple[float, float, float]], warm_up_s: float) -> dict:
    """RSS after warm-up (first sample at or after it), at the end, the peak, and the slopes after warm-up."""
    after = [sample for sample in samples if sample[0] >= warm_up_s] or samples[-1:]
    return {
        "rss_after_warm_up": after[0][1],
        "rss_end": samples[-1][1],
        "rss_peak": max(s[1] for s in samples),
        "rss_slope_mib_per_min": slope_per_minute([(t, total) for t, total, _ in after]),
        "server_alone_slope_mib_per_min": slope_per_minute([(t, alone) for t, _, alone in after]),
        "rss_samples_after_warm_up": len(after),
        "rss_samples": samples,
        "rss_sample_columns": ["seconds of load", "MiB with children", "MiB server process alone"],
    }


def slope_per_minute(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares MiB per minute; None with fewer than two samples."""
    if len(samples) < 2:
        return None
    seconds, mib = zip(*samples, strict=True)
    return 60 * statistics.linear_regression(seconds, mib).slope


def latency_buckets(url: str) -> dict[float, float]:
    """Upper bound (s) -> cumulative count of inference requests, from the server's own histogram."""
    counts: dict[float, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("d2lora_request_latency_seconds_bucket") and any(r in line for r in INFERENCE_ROUTES):
            bound = float(line.split('le="')[1].split('"')[0])
            counts[bound] = counts.get(bound, 0) + float(line.split()[-1])
    return counts


def fastest_bounds(before: dict[float, float], after: dict[float, float], count: int) -> tuple[float, float]:
    """Bucket bounds (s) of the median and the slowest of the `count` fastest requests between two readings."""
    added = sorted((bound, after[bound] - before.get(bound, 0)) for bound in after)
    return bound_reaching(added, math.ceil(count / 2)), bound_reaching(added, count)


def bound_reaching(cumulative: list[tuple[float, float]], count: int) -> float:
    return next((bound for bound, n in cumulative if n >= count), math.inf)
