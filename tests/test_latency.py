"""Latency statistics on synthetic samples (never on wall-clock assertions)."""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.evaluate.measure import time_calls
from toolchain.evaluate.stats import latency_stats


def test_percentiles_and_cv_on_known_samples() -> None:
    s = latency_stats(list(range(1, 101)))  # 1..100 ms
    assert s["n"] == 100
    assert s["p50"] == 50.5 and s["min"] == 1.0
    assert abs(s["p90"] - 90.1) < 1e-9 and abs(s["p99"] - 99.01) < 1e-9
    assert abs(s["mean"] - 50.5) < 1e-9
    assert abs(s["cv"] - np.std(np.arange(1, 101), ddof=1) / 50.5) < 1e-12
    lo, hi = s["p50_ci95"]
    assert lo < 50.5 < hi and lo >= 39 and hi <= 62  # about n/2 -+ sqrt(n)


def test_median_interval_covers_true_median() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        lo, hi = latency_stats(rng.lognormal(mean=2.0, sigma=0.3, size=60))["p50_ci95"]
        hits += lo <= np.exp(2.0) <= hi
    assert 0.90 <= hits / 400 <= 0.995


def test_interval_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(1)
    small = latency_stats(rng.normal(10, 1, 50))["p50_ci95"]
    large = latency_stats(rng.normal(10, 1, 5000))["p50_ci95"]
    assert large[1] - large[0] < (small[1] - small[0]) / 4


def test_time_calls_counts_warmup_and_cycles_batches() -> None:
    seen = []
    samples = time_calls(seen.append, ["a", "b", "c"], warmup=2, min_iters=7, min_seconds=0.0, max_iters=100)
    assert len(samples) == 7 and all(x >= 0 for x in samples)
    assert seen == ["a", "b", "a", "b", "c", "a", "b", "c", "a"]  # 2 warm-up calls, then 7 timed


def test_time_calls_respects_max_iters() -> None:
    samples = time_calls(lambda b: None, [0], warmup=0, min_iters=1, min_seconds=1e9, max_iters=25)
    assert len(samples) == 25


def test_round_ratio_range_covers_the_median_ratio_about_94_percent_of_the_time() -> None:
    from toolchain.evaluate.stats import ratio_interval

    rng = np.random.default_rng(2)
    hits, trials = 0, 2000
    for _ in range(trials):
        drift = rng.lognormal(0, 0.2, size=5)  # the machine slows and speeds up between rounds
        base = 20.0 * drift * rng.lognormal(0, 0.03, size=5)
        variant = 8.0 * drift * rng.lognormal(0, 0.03, size=5)
        lo, hi = ratio_interval(list(variant), list(base))
        hits += lo <= 0.4 <= hi  # the true ratio, 8 / 20 (the median of the per-round ratios' distribution)
    assert 0.90 <= hits / trials <= 0.97  # 1 - 2 * 0.5**5 = 0.9375
    # a shared drift cancels in the ratio: the range stays narrow even when the machine doubles its latency
    assert ratio_interval([8.0, 16.0, 8.2], [20.0, 40.0, 20.1]) == [0.4, pytest.approx(0.40796, abs=1e-4)]


def test_the_pytorch_timing_process_imports_only_what_it_times(tiny_model, tmp_path) -> None:
    """What the measuring process imports adds to the cold start and memory it reports for PyTorch: it loads the
    model and the timing code, never the recipe schema (pydantic) or the engine. (yaml comes with transformers.)"""
    import json

    from toolchain.core.launcher import MeasureProcess

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["a short review, and then a much longer sentence that fills sixteen tokens"] * 4))
    job = tmp_path / "job-pytorch.json"
    job.write_text(
        json.dumps(
            {
                "threads": 1,
                "max_length": 16,
                "format": "pytorch",
                "model": str(tiny_model),
                "tokenizer": str(tiny_model / "tokenizer.json"),
                "texts": str(texts),
                "cases": [[1, 16]],
            }
        )
    )
    proc = MeasureProcess("bench", "pytorch", "toolchain.evaluate.measure", job, threads=1)
    try:
        assert proc.ask()["ready"]
        imported = proc.ask({"cmd": "stop"})["imported"]
        proc.wait()
    finally:
        proc.close()
    assert "toolchain.evaluate.stats" in imported  # the answer does list what the process imported
    assert [m for m in imported if m.split(".")[0] == "pydantic"] == []
    assert [
        m for m in imported if m.startswith(("toolchain.recipe", "toolchain.core.context", "toolchain.engine"))
    ] == []
