"""Timing one model variant: latency statistics, inputs for each bench case, and the per-process measurement
that the bench stage runs (`python -m toolchain.evaluate.measure JOB.json RESULT.json`).

Statistics are computed from raw samples (kept in bench.json) so they can be recomputed and tested without clocks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.runtime import OnnxClassifier, TextEncoder

Feeds = dict[str, np.ndarray]


Feeds = dict[str, np.ndarray]


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


def time_calls(
    step: Callable[[Any], Any], batches: list[Any], warmup: int, min_iters: int, min_seconds: float, max_iters: int
) -> list[float]:
    """Milliseconds per call of `step`, cycling through `batches`, after `warmup` untimed calls."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_iters and (len(samples) < min_iters or time.perf_counter() - start < min_seconds):
        b = batches[len(samples) % len(batches)]
        t0 = time.perf_counter()
        step(b)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def case_inputs(tokenizer_file: Path, max_length: int, texts: list[str], batch: int, seq: int | str) -> list[Feeds]:
    """Encoded batches for one case.

    'real': consecutive eval rows at their own lengths (padded to the longest in each batch), cycled.
    N: every row is N tokens of real eval text (sentences joined, then cut), no padding.
    """
    if seq == "real":
        encoder = TextEncoder(tokenizer_file, max_length)
        return [encoder.encode(texts[i : i + batch]) for i in range(0, len(texts) - batch + 1, batch)][:256]
    feeds = TextEncoder(tokenizer_file, int(seq)).encode([" ".join(texts[:200])] * batch)
    if feeds["input_ids"].shape[1] != int(seq):
        raise ValueError(f"the eval split has too little text to fill {seq} tokens")
    return [feeds]


def _pytorch_step(model_dir: Path, threads: int) -> Callable[[Feeds], Any]:
    import torch

    torch.set_num_threads(threads)
    from toolchain.evaluate.accuracy import load_pytorch

    model = load_pytorch(model_dir)

    def step(feeds: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return model(**feeds).logits

    return step


def case_name(batch: int, seq: int | str) -> str:
    return f"b{batch}_{'real' if seq == 'real' else f's{seq}'}"


def measure_variant(job: dict[str, Any]) -> dict[str, Any]:
    """Load one variant and time every case. Runs in a fresh process (see `bench`): what a model costs to load
    and run is then its own, not polluted by training or by the variants measured before it."""
    threads, tokenizer = job["threads"], Path(job["tokenizer"])
    if job["format"] == "pytorch":
        import torch

        step = _pytorch_step(Path(job["model"]), threads)
        convert: Callable[[Feeds], Any] = lambda f: {k: torch.from_numpy(a) for k, a in f.items()}  # noqa: E731
    else:
        step = OnnxClassifier(job["model"], tokenizer, job["max_length"], threads=threads).run
        convert = lambda f: f  # noqa: E731
    texts = json.loads(Path(job["texts"]).read_text())
    first = convert(case_inputs(tokenizer, job["max_length"], texts, 1, "real")[0])
    step(first)
    first_result_at = time.time()  # wall clock: the parent subtracts the moment it started this process
    per_case = {}
    for b, s in job["cases"]:
        batches = [convert(f) for f in case_inputs(tokenizer, job["max_length"], texts, b, s)]
        samples = time_calls(step, batches, job["warmup"], job["min_iters"], job["min_seconds"], job["max_iters"])
        stats = latency_stats(samples)
        stats["items_per_second"] = b * 1e3 / stats["mean"]
        per_case[case_name(b, s)] = {**stats, "samples_ms": [round(x, 4) for x in samples]}
    return {
        "cases": per_case,
        "first_result_at": first_result_at,
        "peak_rss_bytes": peak_rss_bytes(),
    }


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


if __name__ == "__main__":
    _job, _result = Path(sys.argv[1]), Path(sys.argv[2])
    _result.write_text(json.dumps(measure_variant(json.loads(_job.read_text()))))
