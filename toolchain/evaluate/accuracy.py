"""The evaluate stage: one variant's predictions and accuracy on the whole eval split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register
from toolchain.runtime import OnnxClassifier, TextEncoder, softmax


def pytorch_logits(model_dir: Path, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Logits (N, labels) of a transformers model, tokenized exactly as the ONNX runtime tokenizes."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    encoder = TextEncoder(model_dir / "tokenizer.json", max_length)
    order = np.argsort(encoder.lengths(texts), kind="stable")
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feeds = encoder.encode([texts[i] for i in idx])
            out[idx] = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.float().numpy()
    return out


@register("evaluate", kind="metrics", help="Accuracy and per-row predictions of one variant on the eval split.")
def evaluate(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    texts, labels = ctx.eval.texts, ctx.eval.labels
    max_length = call.config["max_length"]
    hf_dir = inputs["finetune"].path
    if call.config["format"] == "pytorch":
        logits = pytorch_logits(hf_dir, texts, max_length)
    else:
        (model_key,) = [k for k in call.inputs if k != "finetune"]
        clf = OnnxClassifier(
            inputs[model_key].file("model.onnx"), hf_dir / "tokenizer.json", max_length, threads=ctx.threads
        )
        logits = clf.logits(texts)
    probs = softmax(logits)
    pred = probs.argmax(-1)
    correct = int((pred == labels).sum())
    np.save(out / "logits.npy", logits)
    metrics = {
        "variant": call.config["variant"],
        "rows": len(labels),
        "correct": correct,
        "accuracy": correct / len(labels),
        "predictions": pred.tolist(),
        "confidences": [round(float(p), 6) for p in probs.max(-1)],
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    return {"variant": metrics["variant"], "accuracy": metrics["accuracy"], "rows": metrics["rows"]}
