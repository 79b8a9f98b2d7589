"""The bench stage: latency percentiles, throughput, cold start and peak memory of every variant.

Each variant runs in a process of its own (toolchain.evaluate.measure), so that training, or another variant, cannot
pollute its memory or its load time, and the measurement is repeated in rounds: in each round every variant, in a
rotating order, gets a fresh process that loads it (cold start), times every case after a warm-up, and reports its
peak memory. A slow drift of a shared machine then lands on every variant alike, and because each round is a new
process (new memory layout, new thread placement), the spread of the per-round ratios to PyTorch covers what changes
from one run to the next, not only the jitter within one process.
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

from toolchain.compile.parity import check_onnx
from toolchain.evaluate.measure import case_name, time_calls
from toolchain.evaluate.stats import latency_stats, ratio_interval
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register
from toolchain.runlog import child_failed

__all__ = ["available_targets", "bench", "latency_stats", "ratio_interval", "time_calls"]

log = logging.getLogger("toolchain")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
SETTLE_SECONDS = 0.05  # between two processes' turns: let the previous one's threads stop spinning


def available_targets(targets: list[str]) -> tuple[list[str], dict[str, str]]:
    """(targets to measure, {skipped target: why}) for this machine's onnxruntime build and devices. A provider
    that the build lists is started on a one-node model first: onnxruntime falls back to the CPU, with only a log
    line, when its libraries (CUDA, cuDNN, TensorRT) or the device are missing, and a CPU timing must never be
    reported under a GPU target's name."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    measured, skipped = [], {}
    for t in targets:
        if PROVIDERS[t] not in have:
            skipped[t] = (
                f"onnxruntime has no {PROVIDERS[t]} here (install onnxruntime-gpu, built for this machine's CUDA "
                "major version, on a machine with an NVIDIA GPU"
                + (", and put the TensorRT libraries on the library path)" if t == "tensorrt" else ")")
            )
        elif t != "cpu" and (why := provider_fails(PROVIDERS[t])):
            skipped[t] = why
        else:
            measured.append(t)
    return measured, skipped


def provider_fails(provider: str) -> str | None:
    """Why `provider` does not start here (None: it runs), from a session on a one-node model."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[provider, "CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any failure to start is the answer
        return f"{provider} is in this onnxruntime build but did not start: {e}".strip()
    active = session.get_providers()
    if provider not in active:
        return (
            f"{provider} is in this onnxruntime build but did not start (onnxruntime fell back to {active}; its "
            "log above says which library or device is missing)"
        )
    return None


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
            code = self.proc.wait()
            raise child_failed("bench", f"measuring {self.name}", code, self.log.read_text(errors="replace"))
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@register(
    "bench",
    kind="bench",
    help="Latency percentiles, throughput, memory and cold start of every variant, a fresh process per variant and "
    "round, rounds interleaved.",
    version=6,  # 4: interleaved rounds, per-round ratios, extra providers; 6: a fresh process per variant and round
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
            check_onnx("bench", model)
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

    results: dict[str, dict[str, Any]] = {
        name: {"size_bytes": size, "target": target, "cold_start": [], "peak_rss": [], "rounds": {c: [] for c in names}}
        for name, target, _, size in jobs
    }
    per_round = {
        "warmup": cfg["warmup"],
        "min_iters": math.ceil(cfg["min_iters"] / rounds),
        "min_seconds": cfg["min_seconds"] / rounds,
        "max_iters": max(1, cfg["max_iters"] // rounds),
    }
    for name, _, job, _ in jobs:
        (out / f"job-{name}.json").write_text(json.dumps(job))
    bar = tqdm(total=rounds * len(jobs), desc="bench", unit="process")
    try:
        for r in range(rounds):
            # rotate who goes first, so no variant always follows the same neighbour
            for name, _, _, _ in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
                time.sleep(SETTLE_SECONDS)
                proc = _Process(name, out / f"job-{name}.json", threads)
                try:
                    ready = proc.ask()  # process start to first result, nothing else running
                    results[name]["cold_start"].append(ready["first_result_at"] - proc.started)
                    for case in names:
                        answer = proc.ask({"cmd": "time", "case": case, **per_round})
                        results[name]["rounds"][case].append(answer["samples_ms"])
                    results[name]["peak_rss"].append(proc.ask({"cmd": "stop"})["peak_rss_bytes"])
                    proc.proc.wait(timeout=60)
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
            stats = latency_stats(samples)
            stats["items_per_second"] = b * 1e3 / stats["mean"]
            stats["round_p50"] = [float(np.median(c)) for c in chunks]
            per_case[case] = {**stats, "samples_ms": samples}
        variants[name] = {k: v for k, v in res.items() if k != "rounds"} | {"cases": per_case}
        log.info("bench: %-28s %s", name, "  ".join(f"{c} p50 {r['p50']:.2f} ms" for c, r in per_case.items()))
    from toolchain.provenance import git_commit

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
