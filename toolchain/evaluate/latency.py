"""The bench stage: latency percentiles, throughput, cold start and peak memory of every variant, each measured in
a fresh process of its own (toolchain.evaluate.measure) so that training, or a variant measured earlier, cannot
pollute the numbers of the next."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from toolchain.errors import StageError
from toolchain.evaluate.measure import case_name, latency_stats, time_calls
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register

__all__ = ["bench", "latency_stats", "time_calls"]

log = logging.getLogger("toolchain")


@register(
    "bench",
    kind="bench",
    help="Latency percentiles and throughput of every variant, each in its own process.",
    version=3,
)
def bench(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = call.config
    threads = cfg["threads"]
    hf_dir = inputs["finetune"].path
    cases = [(b, s) for s in cfg["seq_lens"] for b in cfg["batch_sizes"]]
    texts = out / "texts.json"
    texts.write_text(json.dumps(ctx.eval.texts[:2048]))
    results: dict[str, Any] = {}
    for v in tqdm(cfg["variants"], desc="bench", unit="variant"):
        if v["format"] == "pytorch":
            model = inputs[v["source"]].path
            size = (model / "model.safetensors").stat().st_size
        else:
            model = inputs[v["source"]].file("model.onnx")
            size = model.stat().st_size
        job = {
            **{k: cfg[k] for k in ("threads", "max_length", "warmup", "min_iters", "min_seconds", "max_iters")},
            "format": v["format"],
            "model": str(model),
            "tokenizer": str(hf_dir / "tokenizer.json"),
            "texts": str(texts),
            "cases": cases,
        }
        job_file, result_file = out / f"job-{v['name']}.json", out / f"result-{v['name']}.json"
        job_file.write_text(json.dumps(job))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "toolchain.evaluate.measure", str(job_file), str(result_file)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise StageError("bench", f"measuring {v['name']} failed in its process:\n{proc.stderr[-2000:]}")
        result = json.loads(result_file.read_text())
        result["cold_start_seconds"] = round(result.pop("first_result_at") - started, 3)  # process start to result
        job_file.unlink()
        result_file.unlink()
        results[v["name"]] = {"size_bytes": size, **result}
        log.info(
            "bench: %-24s %s", v["name"], "  ".join(f"{c} p50 {r['p50']:.2f} ms" for c, r in result["cases"].items())
        )
    texts.unlink()
    from toolchain.report import git_commit

    # The commit these numbers were measured at: reports re-rendered later from a reused bench must not claim theirs.
    bench_data = {"threads": threads, "git_commit": git_commit(), "variants": results}
    (out / "bench.json").write_text(json.dumps(bench_data))
    return {"threads": threads, "cases": [case_name(b, s) for b, s in cases]}
