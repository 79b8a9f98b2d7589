"""The `llm-bench` stage. Time to first token, decode tokens/s, peak memory and load time per variant, a fresh process
per variant and round.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.launcher import measure_once, rotation
from toolchain.core.provenance import git_commit
from toolchain.core.registry import register
from toolchain.core.task import Variant
from toolchain.llm import peers
from toolchain.llm.helpers import PromptConfig, load_tokenizer, prompt_task
from toolchain.paths import PROJECT_ROOT
from toolchain.stages.llm_peer import model_path

log = logging.getLogger("toolchain")


class LlmBenchConfig(PromptConfig):
    variants: list[Variant]
    threads: int
    prompts: int  # eval prompts timed per variant and round
    new_tokens: int  # greedy tokens decoded per prompt
    rounds: int
    passes: int = 1  # the prompts timed this many times per process; the fastest pass's decode counts


@register(
    "llm-bench",
    kind="bench",
    help="Time to first token, decode tokens/s, peak memory and load time per variant, a fresh process per variant "
    "and round.",
    version=3,  # 3: peer rows run by the peer's own runtime; the decode loop's time outside onnxruntime's run
    config=LlmBenchConfig,
)
def llm_bench(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    c = ctx.config(LlmBenchConfig)
    tokenizer = load_tokenizer(inputs["llm-finetune"].path)
    task = prompt_task(c)
    prompts = [
        tokenizer(task.prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in ctx.eval.texts[: c.prompts]
    ]
    jobs = []
    runner: dict[str, tuple[str, str | None, dict[str, str] | None]] = {}  # name -> (module, python, env)
    for v in c.variants:
        if v.format in (peers.GENAI, peers.LLAMA):  # the peer's own runtime, in its own environment
            path = model_path(inputs[v.source], v.name)
            env = {"PYTHONPATH": str(PROJECT_ROOT)}
            runner[v.name] = ("toolchain.llm.peer_child", str(peers.python(v.format)), env)
        else:
            path = inputs[v.source].path if v.format == "pytorch" else inputs[v.source].file("model.onnx")
            runner[v.name] = ("toolchain.llm.measure", None, None)
        job = {
            "format": v.format,
            "peer": v.format,
            "mode": "time",
            "model": str(path),
            "threads": c.threads,
            "prompts": prompts,
            "new_tokens": c.new_tokens,
            "passes": c.passes,
        }
        (out / f"job-{v.name}.json").write_text(json.dumps(job))
        jobs.append(v.name)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    from tqdm import tqdm

    bar = tqdm(total=c.rounds * len(jobs), desc="llm-bench", unit="process")
    try:
        for _, name in rotation(jobs, c.rounds):
            job_file = out / f"job-{name}.json"
            module, python, extra = runner[name]
            results[name].append(measure_once("llm-bench", name, module, job_file, c.threads, python, extra))
            bar.update(1)
    finally:
        bar.close()
        for f in [*out.glob("job-*.json"), *out.glob("job-*.log")]:
            f.unlink()
    variants = {}
    for name, rounds in results.items():
        variants[name] = _summary(rounds, [len(p) for p in prompts], c.new_tokens)
        log.info(
            "llm-bench: %-24s TTFT p50 %.0f ms  decode %.1f tokens/s  peak RSS %.0f MB",
            name,
            variants[name]["ttft_ms"]["p50"],
            variants[name]["decode_tokens_per_second"],
            variants[name]["peak_rss_bytes"] / 1e6,
        )

    data = {
        "threads": c.threads,
        "rounds": c.rounds,
        "passes": c.passes,
        "git_commit": git_commit(),
        "variants": variants,
    }
    (out / "bench.json").write_text(json.dumps(data, indent=2))
    return {"threads": c.threads, "rounds": c.rounds, "variants": list(variants)}


def _summary(rounds: list[dict[str, Any]], prompt_tokens: list[int], new_tokens: int) -> dict[str, Any]:
    """One variant's rounds as bench.json keeps them: time to first token over every prompt of every pass, decode
    tokens/s as the median of the rounds (each round's fastest pass), every pass kept, peak memory, load time."""
    ttft = [x for r in rounds for x in r["first_token_seconds"]]
    per_round_tps = [r["decode_tokens"] / r["decode_seconds"] for r in rounds]
    return {
        "ttft_ms": {
            "p50": 1e3 * float(np.median(ttft)),
            "p90": 1e3 * float(np.percentile(ttft, 90)),
            "n": len(ttft),
        },
        "decode_tokens_per_second": float(np.median(per_round_tps)),
        "decode_tokens_per_second_rounds": per_round_tps,
        # every pass of every round (the fastest pass of a round is the one counted above)
        "decode_tokens_per_second_passes": [
            [r["decode_tokens"] / s for s in r.get("decode_seconds_passes", [r["decode_seconds"]])] for r in rounds
        ],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds),
        "load_seconds": float(np.median([r["load_seconds"] for r in rounds])),
        "decode_outside_run_share": _median_or_none([r.get("decode_outside_run_share") for r in rounds]),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None
