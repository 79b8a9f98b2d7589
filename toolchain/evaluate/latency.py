"""The bench stage: latency percentiles and throughput of every variant, in one process, one after another.

Statistics are computed from raw samples (kept in bench.json) so they can be recomputed and tested without clocks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolchain.evaluate.accuracy import load_pytorch
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register
from toolchain.runtime import OnnxClassifier, TextEncoder

log = logging.getLogger("toolchain")

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
    model = load_pytorch(model_dir)

    def step(feeds: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return model(**feeds).logits

    return step


@register(
    "bench", kind="bench", help="Latency percentiles and throughput of every variant on every bench case.", version=2
)
def bench(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = call.config
    threads = cfg["threads"]
    hf_dir = inputs["finetune"].path
    texts = ctx.eval.texts
    cases = [(b, s) for s in cfg["seq_lens"] for b in cfg["batch_sizes"]]
    results: dict[str, Any] = {}
    bar = tqdm(total=len(cfg["variants"]) * len(cases), desc="bench", unit="case", mininterval=2.0)
    for v in cfg["variants"]:
        if v["format"] == "pytorch":
            import torch

            step = _pytorch_step(hf_dir, threads)
            convert: Callable[[Feeds], Any] = lambda f: {k: torch.from_numpy(a) for k, a in f.items()}  # noqa: E731
            size = (hf_dir / "model.safetensors").stat().st_size
        else:
            path = inputs[v["source"]].file("model.onnx")
            clf = OnnxClassifier(path, hf_dir / "tokenizer.json", cfg["max_length"], threads=threads)
            step, convert = clf.run, (lambda f: f)
            size = path.stat().st_size
        per_case = {}
        for b, s in cases:
            name = f"b{b}_{'real' if s == 'real' else f's{s}'}"
            batches = [convert(f) for f in case_inputs(hf_dir / "tokenizer.json", cfg["max_length"], texts, b, s)]
            samples = time_calls(step, batches, cfg["warmup"], cfg["min_iters"], cfg["min_seconds"], cfg["max_iters"])
            stats = latency_stats(samples)
            stats["items_per_second"] = b * 1e3 / stats["mean"]
            per_case[name] = {**stats, "samples_ms": [round(x, 4) for x in samples]}
            bar.update(1)
        results[v["name"]] = {"size_bytes": size, "cases": per_case}
        log.info("bench: %-24s %s", v["name"], "  ".join(f"{c} p50 {r['p50']:.2f} ms" for c, r in per_case.items()))
    bar.close()
    (out / "bench.json").write_text(json.dumps({"threads": threads, "variants": results}))
    return {"threads": threads, "cases": [f"b{b}_{'real' if s == 'real' else f's{s}'}" for b, s in cases]}
