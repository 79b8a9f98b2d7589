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
from toolchain.core.registry import register
from toolchain.llm.helpers import PromptConfig, load_tokenizer, prompt_task, stop_token_ids
from toolchain.runtime import DecoderGenerator, common_prefix

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
    version=3,  # 3: prompts are encoded whole (the saved tokenizer's training truncation no longer applies)
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
    seconds = time.perf_counter() - t0
    parsed = [task.parse(a) for a in answers]
    correct = sum(int(p == int(y)) for p, y in zip(parsed, evl.labels, strict=True))
    metrics = {
        "variant": c.variant,
        "accuracy": correct / len(prompts),
        "correct": correct,
        "eval_rows": len(prompts),
        "unparsed": sum(p is None for p in parsed),
        "max_new_tokens": c.max_new_tokens,
        "batch_size": c.eval_batch_size,
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
        100 * correct / len(prompts),
        metrics["unparsed"],
        seconds,
    )
    return metrics
