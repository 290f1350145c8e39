"""Comparisons against a baseline measured in the same test, by significance, not by a constant
tuned until the test passed."""

from __future__ import annotations

import math


def clearly_more(hits: int, baseline_hits: int, trials: int, z: float = 3.0) -> bool:
    """Whether `hits` of `trials` is a higher rate than `baseline_hits` of as many trials, by a
    one-sided two-proportion z-test at `z` standard errors (z=3: a 1-in-700 fluke)."""
    p, q = hits / trials, baseline_hits / trials
    pooled = (hits + baseline_hits) / (2 * trials)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / trials)
    return (p - q) / se >= z
