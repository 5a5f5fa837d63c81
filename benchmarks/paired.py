"""Paired accuracy gaps: two scorings of the same items, their difference in points and its 95% interval.

The interval is a paired bootstrap over items (resample items with replacement,
recompute the mean of the per-item difference), so it reflects that both
scorings saw the very same items; `better` / `worse` count the discordant items
(McNemar's b and c).  With no discordant item the interval is [0, 0]: the two
scorings agree on every item drawn, which is what the counts say.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000


def accuracy(correct: Sequence[bool]) -> float:
    return 100.0 * sum(correct) / len(correct)


def paired_gap(candidate: Sequence[bool], reference: Sequence[bool], seed: int = 0) -> dict:
    """candidate − reference in accuracy points, with its paired-bootstrap 95% interval."""
    if len(candidate) != len(reference) or not candidate:
        raise ValueError(f"paired scorings need the same items, got {len(candidate)} and {len(reference)}")
    diff = np.asarray(candidate, dtype=np.int8) - np.asarray(reference, dtype=np.int8)  # (items,) in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diff), size=(RESAMPLES, len(diff)))  # (resamples, items)
    means = 100.0 * diff[draws].mean(axis=1)  # (resamples,)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "gap_points": 100.0 * float(diff.mean()),
        "ci95_points": [float(low), float(high)],
        "better": int((diff > 0).sum()),
        "worse": int((diff < 0).sum()),
    }
