"""Statistics of latency samples, computed from the raw samples so they can be recomputed and tested without clocks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def latency_stats(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Percentiles, mean, coefficient of variation and a 95% distribution-free interval for the median."""
    x = np.sort(np.asarray(samples_ms, dtype=np.float64))
    n = len(x)
    if n == 0:
        raise ValueError("no latency samples")
    # Order-statistic interval for the median: ranks n/2 -+ 1.96*sqrt(n)/2 (normal approximation to the binomial).
    half = 1.96 * math.sqrt(n) / 2
    lo = x[max(0, math.floor(n / 2 - half) - 1)]
    hi = x[min(n - 1, math.ceil(n / 2 + half) - 1)]
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    return {
        "n": n,
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "p99": float(np.percentile(x, 99)),
        "mean": mean,
        "min": float(x[0]),
        "cv": std / mean if mean > 0 else 0.0,
        "p50_ci95": [float(lo), float(hi)],
    }


def ratio_interval(variant_round_p50: list[float], base_round_p50: list[float]) -> list[float]:
    """[min, max] of the per-round ratios variant p50 / baseline p50. With R rounds this range covers the median
    ratio with probability 1 - 2 * 0.5**R (94% for R = 5), whatever the noise's distribution."""
    ratios = [v / b for v, b in zip(variant_round_p50, base_round_p50, strict=True)]
    return [float(min(ratios)), float(max(ratios))]


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM, not getrusage's ru_maxrss: on Linux the latter keeps the peak of
    the parent that forked this process, which would charge every variant with the parent's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
