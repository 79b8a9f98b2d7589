"""The `pair-evaluate` stage: one cross-encoder variant on the eval and test pairs, through its own runtime:
accuracy (classification) or Spearman and Pearson x 100 of its score against the gold scores (regression)."""

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
from toolchain.data import text_items
from toolchain.embed.metrics import correlations
from toolchain.evaluate.torch_model import load_pytorch, pytorch_logits
from toolchain.runtime import TextEncoder, make_classifier, softmax

PYTORCH_BATCH = 32


class PairEvaluateConfig(StageConfig):
    variant: str
    format: str  # pytorch | onnx
    max_length: int
    batch_size: int
    objective: str  # classification | regression


@register(
    "pair-evaluate",
    kind="metrics",
    help="Accuracy (classification) or Spearman/Pearson (regression) of one cross-encoder variant on eval and test.",
    config=PairEvaluateConfig,
)
def pair_evaluate(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(PairEvaluateConfig)
    hf_dir = inputs["finetune"].path
    model = inputs[call.inputs[0]].path
    splits = {"eval": ctx.eval} | ({"test": ctx.test} if ctx.test is not None else {})
    bar = tqdm(total=sum(len(s) for s in splits.values()), desc=call.key, unit="pair", mininterval=2.0)
    if cfg.format == "pytorch":
        encoder = TextEncoder(hf_dir / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD)
        pt = load_pytorch(model)
        batch = max(cfg.batch_size, PYTORCH_BATCH)  # fp32 PyTorch's outputs do not depend on what shares a batch

        def run(items: list[Any]) -> np.ndarray:
            return pytorch_logits(pt, encoder, items, batch, bar.update)
    else:
        graph = graph_file(model)
        check_onnx("pair-evaluate", graph)
        runner = make_classifier(
            "onnxruntime",
            graph,
            hf_dir / "tokenizer.json",
            cfg.max_length,
            ctx.threads,
            fields=model_inputs.ENCODING_FIELD,
        )

        def run(items: list[Any]) -> np.ndarray:
            return runner.logits(items, cfg.batch_size, bar.update)

    metrics: dict[str, Any] = {"variant": cfg.variant, "objective": cfg.objective}
    for name, split in splits.items():
        logits = run(text_items(split))
        if cfg.objective == "regression":
            scores = logits[:, 0].astype(np.float64)
            metrics[name] = {
                "pairs": len(split),
                **correlations(scores, split.labels),
                "scores": scores.round(6).tolist(),
            }
        else:
            probs = softmax(logits)
            pred = probs.argmax(-1)
            correct = int((pred == split.labels).sum())
            metrics[name] = {
                "pairs": len(split),
                "correct": correct,
                "accuracy": correct / len(split),
                "predictions": pred.tolist(),
            }
    bar.close()
    (out / "metrics.json").write_text(json.dumps(metrics))
    key = "spearman" if cfg.objective == "regression" else "accuracy"
    return {"variant": cfg.variant, key: {k: round(metrics[k][key], 4) for k in splits}}
