"""The bench stage: latency percentiles, throughput, cold start and peak memory of every variant.

Each variant runs in a process of its own (toolchain.evaluate.measure), so that training, or another variant, cannot
pollute its memory or its load time. All the processes stay loaded, and the cases are timed in interleaved rounds
(every variant once per case per round, in a rotating order): a slow drift of a shared machine then lands on every
variant alike, and the spread of the per-round ratios to PyTorch measures how far a ratio can be trusted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolchain.errors import StageError
from toolchain.evaluate.measure import case_name, time_calls
from toolchain.evaluate.stats import latency_stats, ratio_interval
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register

__all__ = ["available_targets", "bench", "latency_stats", "ratio_interval", "time_calls"]

log = logging.getLogger("toolchain")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
SETTLE_SECONDS = 0.05  # between two processes' turns: let the previous one's threads stop spinning


def available_targets(targets: list[str]) -> tuple[list[str], dict[str, str]]:
    """(targets to measure, {skipped target: why}) for this machine's onnxruntime build and devices."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    measured, skipped = [], {}
    for t in targets:
        if PROVIDERS[t] in have:
            measured.append(t)
        elif t == "cuda":
            skipped[t] = (
                "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a machine with an NVIDIA "
                "GPU and CUDA 12)"
            )
        else:
            skipped[t] = (
                f"onnxruntime has no {PROVIDERS[t]} here (an onnxruntime-gpu build with TensorRT libraries on the "
                "library path)"
            )
    return measured, skipped


class _Process:
    """A running measure process for one variant (and one provider)."""

    def __init__(self, name: str, job_file: Path, threads: int):
        self.name = name
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        # stderr to a file, not a pipe: a chatty library must not block the process on a full pipe
        self.log = job_file.with_suffix(".log")
        self.started = time.time()
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "toolchain.evaluate.measure", str(job_file)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )

    def ask(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            err = self.log.read_text(errors="replace")
            raise StageError("bench", f"measuring {self.name} failed in its process:\n{err[-2000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@register(
    "bench",
    kind="bench",
    help="Latency percentiles, throughput, memory and cold start of every variant, each in its own process, "
    "timed in interleaved rounds.",
    version=5,  # 4: interleaved rounds, per-round ratios, extra providers; 5: lighter warm-up after round 1
)
def bench(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = call.config
    threads, rounds = cfg["threads"], cfg["rounds"]
    hf_dir = inputs["finetune"].path
    cases = [(b, s) for s in cfg["seq_lens"] for b in cfg["batch_sizes"]]
    names = [case_name(b, s) for b, s in cases]
    texts = out / "texts.json"
    texts.write_text(json.dumps(ctx.eval.texts[:2048]))
    measured_targets, skipped = available_targets(cfg["targets"])
    for target, why in skipped.items():
        log.info("bench: %s skipped: %s", target, why)

    jobs: list[tuple[str, str, dict[str, Any], int]] = []  # (row name, target, job, size)
    for v in cfg["variants"]:
        if v["format"] == "pytorch":
            model = inputs[v["source"]].path
            size = (model / "model.safetensors").stat().st_size
        else:
            model = inputs[v["source"]].file("model.onnx")
            size = model.stat().st_size
        for target in measured_targets:
            if target != "cpu" and v["format"] != "onnx":
                continue
            job = {
                "threads": threads,
                "max_length": cfg["max_length"],
                "format": v["format"],
                "model": str(model),
                "providers": [PROVIDERS[target], "CPUExecutionProvider"],
                "tokenizer": str(hf_dir / "tokenizer.json"),
                "texts": str(texts),
                "cases": cases,
            }
            jobs.append((v["name"] if target == "cpu" else f"{v['name']}@{target}", target, job, size))

    processes: dict[str, _Process] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        # Load one at a time: cold start is process start to first result with nothing else loading.
        for name, target, job, size in tqdm(jobs, desc="bench: load", unit="variant"):
            job_file = out / f"job-{name}.json"
            job_file.write_text(json.dumps(job))
            proc = _Process(name, job_file, threads)
            ready = proc.ask()
            processes[name] = proc
            results[name] = {
                "size_bytes": size,
                "target": target,
                "cold_start_seconds": round(ready["first_result_at"] - proc.started, 3),
                "rounds": {c: [] for c in names},
            }
        per_round = {
            "warmup": cfg["warmup"],  # the first round; later rounds re-warm caches with fewer runs
            "min_iters": math.ceil(cfg["min_iters"] / rounds),
            "min_seconds": cfg["min_seconds"] / rounds,
            "max_iters": max(1, cfg["max_iters"] // rounds),
        }
        order = list(processes)
        bar = tqdm(total=rounds * len(names) * len(order), desc="bench: time", unit="case")
        for r in range(rounds):
            for case in names:
                # rotate who goes first, so no variant always follows the same neighbour
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    time.sleep(SETTLE_SECONDS)
                    warmup = per_round["warmup"] if r == 0 else math.ceil(per_round["warmup"] / rounds)
                    answer = processes[name].ask({"cmd": "time", "case": case, **per_round, "warmup": warmup})
                    results[name]["rounds"][case].append(answer["samples_ms"])
                    bar.update(1)
        bar.close()
        for name, proc in processes.items():
            results[name]["peak_rss_bytes"] = proc.ask({"cmd": "stop"})["peak_rss_bytes"]
            proc.proc.wait(timeout=60)
    finally:
        for proc in processes.values():
            proc.close()
        for f in [*out.glob("job-*.json"), *out.glob("job-*.log")]:
            f.unlink()
        texts.unlink()

    variants: dict[str, Any] = {}
    for name, res in results.items():
        per_case = {}
        for (b, _), case in zip(cases, names, strict=True):
            chunks = res["rounds"][case]
            samples = [x for chunk in chunks for x in chunk]
            stats = latency_stats(samples)
            stats["items_per_second"] = b * 1e3 / stats["mean"]
            stats["round_p50"] = [float(np.median(c)) for c in chunks]
            per_case[case] = {**stats, "samples_ms": samples}
        variants[name] = {k: v for k, v in res.items() if k != "rounds"} | {"cases": per_case}
        log.info("bench: %-28s %s", name, "  ".join(f"{c} p50 {r['p50']:.2f} ms" for c, r in per_case.items()))
    from toolchain.report import git_commit

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
