"""The `bench` stage. Latency percentiles, throughput, memory and cold start of every variant, a fresh process per
variant and round, rounds interleaved.

Helpers: `toolchain.evaluate.latency`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field
from tqdm.auto import tqdm

from toolchain.compile.parity import check_onnx, graph_bytes, graph_file
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.launcher import MeasureProcess, rotation
from toolchain.core.provenance import git_commit
from toolchain.core.registry import register
from toolchain.core.task import Variant
from toolchain.data import text_items
from toolchain.evaluate.latency import PROVIDERS, available_targets
from toolchain.evaluate.measure import case_name
from toolchain.evaluate.stats import latency_stats
from toolchain.recipe.schema import BenchSection
from toolchain.runtime import openvino_hint

log = logging.getLogger("toolchain")


class BenchConfig(BenchSection):
    """The recipe's `bench` section with the thread count resolved, the bundle's max_length and the variants."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    threads: int  # resolved: the recipe's, else this machine's cores
    max_length: int
    variants: list[Variant]
    pairs: bool = False  # the variants read (text, text_pair) pairs: timed on the eval pairs
    # variant -> the sequence lengths it runs at (OpenVINO: bundle.shape_buckets)
    buckets: dict[str, list[int]] = Field(default_factory=dict)


# long: one measurement protocol (jobs, interleaved rounds, statistics) in one read
@register(
    "bench",
    kind="bench",
    help="Latency percentiles, throughput, memory and cold start of every variant, a fresh process per variant and "
    "round, rounds interleaved.",
    # 4: interleaved rounds, per-round ratios, extra providers; 6: a fresh process per variant and round; 7: CPU
    # sessions keep Add + LayerNormalization unfused (runtime.CPU_SESSION_CONFIG)
    version=7,
    config=BenchConfig,
)
def bench(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(BenchConfig)
    threads, rounds = cfg.threads, cfg.rounds
    hf_dir = inputs["finetune"].path
    cases = [(b, s) for s in cfg.seq_lens for b in cfg.batch_sizes]
    names = [case_name(b, s) for b, s in cases]
    texts = out / "texts.json"
    # a cross-encoder is timed on its eval pairs, (text, text_pair) read together
    texts.write_text(json.dumps(text_items(ctx.eval)[:2048] if cfg.pairs else ctx.eval.texts[:2048]))
    measured_targets, skipped = available_targets(list(cfg.targets))
    for target, why in skipped.items():
        log.info("bench: %s skipped: %s", target, why)

    jobs: list[tuple[str, str, dict[str, Any], int]] = []  # (row name, target, job, size)
    for v in cfg.variants:
        if v.format == "pytorch":
            model = inputs[v.source].path
            size = (model / "model.safetensors").stat().st_size
        else:
            model = graph_file(inputs[v.source].path)
            if model.suffix == ".onnx":
                check_onnx("bench", model)
            size = graph_bytes(model)
        for target in measured_targets:
            if target != "cpu" and v.format != "onnx":
                continue
            job = {
                "threads": threads,
                "max_length": cfg.max_length,
                "format": v.format,
                "model": str(model),
                "providers": [PROVIDERS[target], "CPUExecutionProvider"],
                "precision": openvino_hint(v.precision) if v.format == "openvino" else None,
                "buckets": cfg.buckets.get(v.name, []),
                "tokenizer": str(hf_dir / "tokenizer.json"),
                "texts": str(texts),
                "cases": cases,
            }
            jobs.append((v.name if target == "cpu" else f"{v.name}@{target}", target, job, size))

    results: dict[str, dict[str, Any]] = {
        name: {"size_bytes": size, "target": target, "cold_start": [], "peak_rss": [], "rounds": {c: [] for c in names}}
        for name, target, _, size in jobs
    }
    per_round = {
        "warmup": cfg.warmup,
        "min_iters": math.ceil(cfg.min_iters / rounds),
        "min_seconds": cfg.min_seconds / rounds,
        "max_iters": max(1, cfg.max_iters // rounds),
    }
    for name, _, job, _ in jobs:
        (out / f"job-{name}.json").write_text(json.dumps(job))
    bar = tqdm(total=rounds * len(jobs), desc="bench", unit="process")
    try:
        for _, name in rotation([name for name, _, _, _ in jobs], rounds):
            proc = MeasureProcess("bench", name, "toolchain.evaluate.measure", out / f"job-{name}.json", threads)
            try:
                ready = proc.ask()  # process start to first result, nothing else running
                results[name]["cold_start"].append(ready["first_result_at"] - proc.started)
                for case in names:
                    answer = proc.ask({"cmd": "time", "case": case, **per_round})
                    results[name]["rounds"][case].append(answer["samples_ms"])
                results[name]["peak_rss"].append(proc.ask({"cmd": "stop"})["peak_rss_bytes"])
                proc.wait()
            finally:
                proc.close()
            bar.update(1)
    finally:
        bar.close()
        for f in [*out.glob("job-*.json"), *out.glob("job-*.log")]:
            f.unlink()
        texts.unlink()
    for res in results.values():
        res["cold_start_seconds"] = round(float(np.median(res.pop("cold_start"))), 3)
        res["peak_rss_bytes"] = max(res.pop("peak_rss"))

    variants: dict[str, Any] = {}
    for name, res in results.items():
        per_case = {}
        for (b, _), case in zip(cases, names, strict=True):
            chunks = res["rounds"][case]
            samples = [x for chunk in chunks for x in chunk]
            stats: dict[str, Any] = dict(latency_stats(samples))
            stats["items_per_second"] = b * 1e3 / stats["mean"]
            stats["round_p50"] = [float(np.median(c)) for c in chunks]
            per_case[case] = {**stats, "samples_ms": samples}
        variants[name] = {k: v for k, v in res.items() if k != "rounds"} | {"cases": per_case}
        log.info("bench: %-28s %s", name, "  ".join(f"{c} p50 {r['p50']:.2f} ms" for c, r in per_case.items()))

    # The commit these numbers were measured at: reports re-rendered later from a reused bench must not claim theirs.
    bench_data = {
        "threads": threads,
        "rounds": rounds,
        "git_commit": git_commit(),
        "targets": {"measured": measured_targets, "skipped": skipped},
        "variants": variants,
    }
    (out / "bench.json").write_text(json.dumps(bench_data))
    return {"threads": threads, "rounds": rounds, "cases": names, "targets": measured_targets, "skipped": skipped}
