"""The `llm-evaluate` stage. Accuracy on the eval split from greedy answers; greedy continuations of the fixed agreement
prompts.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.launcher import measure_once
from toolchain.core.registry import register
from toolchain.llm import peers
from toolchain.llm.helpers import PromptConfig, load_tokenizer, prompt_task, stop_token_ids
from toolchain.paths import PROJECT_ROOT
from toolchain.runtime import DecoderGenerator, common_prefix
from toolchain.stages.llm_peer import model_path

log = logging.getLogger("toolchain")


class LlmEvaluateConfig(PromptConfig):
    variant: str
    format: str  # pytorch | onnx
    source: str  # the input holding the model
    tokenizer_from: str  # the input holding the tokenizer
    max_new_tokens: int
    eval_batch_size: int
    agreement: bool  # also generate the agreement continuations
    agreement_prompts: int
    agreement_tokens: int


@register(
    "llm-evaluate",
    kind="metrics",
    help="Accuracy on the eval split from greedy answers; greedy continuations of the fixed agreement prompts.",
    # 3: prompts are encoded whole (the saved tokenizer's training truncation no longer applies); 4: peers' answers,
    # and the batch size the fused graph really ran (one prompt at a time)
    version=4,
    config=LlmEvaluateConfig,
)
def llm_evaluate(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from tqdm import tqdm

    c = ctx.config(LlmEvaluateConfig)
    task = prompt_task(c, c.max_new_tokens)
    tok_dir = inputs[c.tokenizer_from].path
    tokenizer = load_tokenizer(tok_dir)
    stops = stop_token_ids(tokenizer)
    evl = ctx.eval
    prompts = [task.prompt(tokenizer, t) for t in evl.texts]
    t0 = time.perf_counter()
    if c.format in (peers.GENAI, peers.LLAMA):
        answers = peer_answers(ctx, c, inputs[c.source], tok_dir, prompts, stops, task.stop_strings, out)
        return _metrics(c, evl, task, answers, [], [], 1, time.perf_counter() - t0, out)
    if c.format == "pytorch":
        from toolchain.llm.torch_decoder import TorchDecoder

        gen: DecoderGenerator = TorchDecoder(
            inputs[c.source].path, tok_dir / "tokenizer.json", ctx.threads, eos_token_ids=stops
        )
    else:
        gen = DecoderGenerator(
            inputs[c.source].file("model.onnx"), tok_dir / "tokenizer.json", ctx.threads, eos_token_ids=stops
        )
    prefix = common_prefix([gen.encode(p) for p in prompts])
    gen.set_prefix(prefix)
    with tqdm(total=len(prompts), desc=call.key, unit="row", mininterval=5) as bar:
        answers = gen.generate_batch(
            prompts, c.max_new_tokens, task.stop_strings, c.eval_batch_size, progress=bar.update
        )
    agreement: list[list[int]] = []
    if c.agreement:
        gen.set_prefix([])
        for text in evl.texts[: c.agreement_prompts]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            agreement.append(gen.generate_ids(ids, c.agreement_tokens)[0])
    batch = c.eval_batch_size if gen.can_pad else 1  # the fused graph runs its prompts one at a time
    return _metrics(c, evl, task, answers, agreement, prefix, batch, time.perf_counter() - t0, out)


def _metrics(
    c: LlmEvaluateConfig,
    evl: Any,
    task: Any,
    answers: list[str],
    agreement: list[list[int]],
    prefix: list[int],
    batch_size: int,
    seconds: float,
    out: Path,
) -> dict[str, Any]:
    parsed = [task.parse(a) for a in answers]
    correct = sum(int(p == int(y)) for p, y in zip(parsed, evl.labels, strict=True))
    metrics = {
        "variant": c.variant,
        "accuracy": correct / len(answers),
        "correct": correct,
        "eval_rows": len(answers),
        "unparsed": sum(p is None for p in parsed),
        "max_new_tokens": c.max_new_tokens,
        "batch_size": batch_size,
        "prefix_ids": prefix,
        "seconds": round(seconds, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "answers.json").write_text(json.dumps(answers))
    if agreement:
        (out / "agreement.json").write_text(json.dumps(agreement))
    log.info(
        "llm-evaluate: %s accuracy %.2f%% (%d unparsed answers) in %.0f s",
        c.variant,
        100 * correct / len(answers),
        metrics["unparsed"],
        seconds,
    )
    return metrics


def peer_answers(
    ctx: StageContext,
    c: LlmEvaluateConfig,
    art: Artifact,
    tok_dir: Path,
    prompts: list[str],
    stops: list[int],
    stop_strings: list[str],
    out: Path,
) -> list[str]:
    """A peer's answers from its own runtime in its own environment, fed the ids this tokenizer makes (as every
    variant is): max_new_tokens each, cut after the end of turn and at the first stop string, as the runtime's
    greedy loop stops."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    job = {
        "peer": c.format,
        "mode": "answer",
        "model": str(model_path(art, c.variant)),
        "threads": ctx.threads,
        "prompts": [tok.encode(p, add_special_tokens=False).ids for p in prompts],
        "new_tokens": c.max_new_tokens,
    }
    job_file = out / "job.json"
    job_file.write_text(json.dumps(job))
    env = {"PYTHONPATH": str(PROJECT_ROOT)}
    python = str(peers.python(c.format))
    try:
        found = measure_once("llm-evaluate", c.variant, "toolchain.llm.peer_child", job_file, ctx.threads, python, env)
    finally:
        job_file.unlink()
        job_file.with_suffix(".log").unlink(missing_ok=True)
    answers = []
    for ids in found["ids"]:
        end = next((k for k, i in enumerate(ids) if i in stops), len(ids))
        text = tok.decode(ids[:end], skip_special_tokens=True)
        for s in stop_strings:
            text = text.split(s, 1)[0]
        answers.append(text)
    return answers
