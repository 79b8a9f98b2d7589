"""The `tag-evaluate` stage: one token-classifier variant's entity-level F1 (exact span and type, seqeval) on the
eval and test sentences, overall and per entity type, from each word's tag at its first sub-token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolchain import model_inputs
from toolchain.compile.parity import check_onnx, graph_file
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.data import Split
from toolchain.runtime import TextEncoder, encode_words, make_classifier, softmax
from toolchain.tag.metrics import entity_scores


class TagEvaluateConfig(StageConfig):
    variant: str
    format: str  # pytorch | onnx
    max_length: int
    batch_size: int
    labels: list[str]


def _logits_fn(cfg: TagEvaluateConfig, model: Path, hf_dir: Path, threads: int) -> Any:
    """feeds -> (B, T, tags) logits through the variant's own runtime."""
    if cfg.format == "pytorch":
        import torch

        from toolchain.evaluate.torch_model import load_pytorch

        pt = load_pytorch(model)
        takes = model_inputs.forward_inputs(pt)

        def run_pytorch(feeds: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                batch = {k: torch.from_numpy(v) for k, v in model_inputs.select(feeds, takes).items()}
                return np.asarray(pt(**batch).logits.float().numpy())

        return run_pytorch
    graph = graph_file(model)
    check_onnx("tag-evaluate", graph)
    runner = make_classifier(
        "onnxruntime", graph, hf_dir / "tokenizer.json", cfg.max_length, threads, fields=model_inputs.ENCODING_FIELD
    )
    return runner.run


def predict_tags(run: Any, encoder: TextEncoder, split: Split, batch_size: int, tick: Any) -> list[list[int]]:
    """Each word's predicted tag id (a word cut off at max_length: tag 0, O), sentences in batches of similar length."""
    words = split.words
    assert words is not None
    out: list[list[int]] = [[] for _ in words]
    order = np.argsort([len(w) for w in words], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = [int(i) for i in order[start : start + batch_size] if words[int(i)]]
        if idx:
            feeds, firsts = encode_words(encoder, [words[i] for i in idx])
            probs = softmax(run(feeds))
            for j, i in enumerate(idx):
                out[i] = [int(probs[j, f].argmax()) if f >= 0 else 0 for f in firsts[j]]
        tick(len(order[start : start + batch_size]))
    return out


@register(
    "tag-evaluate",
    kind="metrics",
    help="Entity-level F1 (seqeval) of one token-classifier variant on the eval and test sentences.",
    config=TagEvaluateConfig,
)
def tag_evaluate(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(TagEvaluateConfig)
    hf_dir = inputs["finetune"].path
    run = _logits_fn(cfg, inputs[call.inputs[0]].path, hf_dir, ctx.threads)
    encoder = TextEncoder(hf_dir / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD)
    splits = {"eval": ctx.eval} | ({"test": ctx.test} if ctx.test is not None else {})
    bar = tqdm(total=sum(len(s) for s in splits.values()), desc=call.key, unit="sentence", mininterval=2.0)
    batch = cfg.batch_size if cfg.format != "pytorch" else max(cfg.batch_size, 32)
    metrics: dict[str, Any] = {"variant": cfg.variant}
    for name, split in splits.items():
        assert split.tags is not None
        predicted = predict_tags(run, encoder, split, batch, bar.update)
        gold = [[cfg.labels[t] for t in ts] for ts in split.tags]
        tags = [[cfg.labels[t] for t in ts] for ts in predicted]
        metrics[name] = {"sentences": len(split), **entity_scores(gold, tags), "predicted": predicted}
    bar.close()
    (out / "metrics.json").write_text(json.dumps(metrics))
    return {"variant": cfg.variant, "f1": {k: round(metrics[k]["f1"], 2) for k in splits}}
