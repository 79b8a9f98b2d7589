"""What the generation stages share: the tokenizer, the prompt task (template, chat affixes, label words), the stop
tokens, saving a model folder, the projection sensitivity ranking, the model's context length."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from toolchain.compile.graph import matmul_nbits
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig
from toolchain.data import Split
from toolchain.llm.task import PromptTask, end_of_turn
from toolchain.runtime import DecoderGenerator

log = logging.getLogger("toolchain")


class PromptConfig(StageConfig):
    """The prompt a generation stage builds, from its identity (which its id hashes). Only the stages that parse
    answers have the stop strings in their id; the others build prompts and answers, which do not use them."""

    labels: list[str]
    template: str
    chat: bool
    stop_strings: list[str] = Field(default_factory=list)


def prompt_task(cfg: PromptConfig, max_new_tokens: int = 4) -> PromptTask:
    return PromptTask(list(cfg.labels), cfg.template, cfg.chat, max_new_tokens, list(cfg.stop_strings))


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end an answer: the chat template's end of turn and the tokenizer's eos."""

    ids = {tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def save_model(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# long: the groups, the probe builds and the margins they are scored by, in one read
def rank_projections(
    ctx: StageContext, src: Path, tokenizer_dir: Path, task: PromptTask, rows: Split, c: Any, out: Path
) -> list[dict]:
    """How much each projection group costs when it alone is quantized at this variant's bits: each projection
    over all layers (q_proj, v_proj, down_proj, ...), then each layer's projections together. Measured on held-out
    prompts (not the eval split) as the change of the margin between the label words' first tokens after the
    prompt, against the fp32 graph, and how many rows change sides."""
    import re

    import onnx

    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = [tokenizer(task.prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in rows.texts]
    first = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in task.labels[:2]]

    def margins(path: Path) -> np.ndarray:
        gen = DecoderGenerator(path, threads=ctx.threads)
        logits = [gen.step(np.array([p]), gen.empty_past(), len(p))[0] for p in prompts]
        return np.array([x[first[1]] - x[first[0]] for x in logits])

    reference = margins(src)
    names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
    groups: dict[str, list[str]] = {}  # each projection over all layers, then each layer's projections
    for name in names:
        groups.setdefault(re.sub(r"layers\.\d+", "layers.*", name), []).append(name)
    for name in names:
        layer = re.search(r"/layers\.\d+/", name)
        if layer and "_proj/" in name:
            groups.setdefault(f"{layer[0]}*_proj", []).append(name)
    ranking = []
    probe = out / "probe.onnx"
    for group, members in groups.items():
        if len(members) < 2 and "_proj" not in group:  # not a projection (attention's scores have no weight)
            continue
        matmul_nbits(src, probe, c.block_size, c.symmetric, c.accuracy_level, only=members, bits=c.bits)
        m = margins(probe)
        if np.array_equal(m, reference):  # nothing quantized: MatMuls without a constant weight
            continue
        ranking.append(
            {
                "group": group,
                "nodes": len(members),
                "margin_mse": float(((m - reference) ** 2).mean()),
                "rows_changing_side": int(((m > 0) != (reference > 0)).sum()),
                "rows": len(prompts),
            }
        )
    probe.unlink(missing_ok=True)
    ranking.sort(key=lambda r: -r["margin_mse"])
    worst = ", ".join(f"{r['group']} {r['margin_mse']:.3f}" for r in ranking[:4])
    log.info("llm-quantize: projection sensitivity at %d bits on %d rows: %s", c.bits, len(prompts), worst)
    return ranking


def context_length(model_dir: Path) -> int | None:
    """Prompt + answer tokens the model takes (its max_position_embeddings), None when its config does not say."""
    config = json.loads((model_dir / "config.json").read_text())
    value = config.get("max_position_embeddings")
    return int(value) if value else None
