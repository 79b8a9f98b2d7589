"""The evaluate stage: one variant's predictions and accuracy on the whole eval split."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolchain.compile.parity import check_onnx
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register
from toolchain.runtime import OnnxClassifier, TextEncoder, softmax


def load_pytorch(model_dir: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()


def pytorch_logits(
    model: Any,
    encoder: TextEncoder,
    texts: list[str],
    batch_size: int = 1,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Logits (N, labels) of a transformers model, fed exactly the arrays the ONNX runtime is fed, batched the same."""
    import torch

    order = np.argsort(encoder.lengths(texts), kind="stable")
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feeds = encoder.encode([texts[i] for i in idx])
            out[idx] = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.float().numpy()
            if on_batch is not None:
                on_batch(len(idx))
    return out


@register("evaluate", kind="metrics", help="Accuracy and per-row predictions of one variant on the eval split.")
def evaluate(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    texts, labels = ctx.eval.texts, ctx.eval.labels
    max_length = call.config["max_length"]
    hf_dir = inputs["finetune"].path
    batch_size = call.config["batch_size"]
    bar = tqdm(total=len(texts), desc=call.key, unit="row", mininterval=2.0)
    model_key = call.inputs[0]  # the variant's own artifact (the teacher's for pytorch-fp32)
    if call.config["format"] == "pytorch":
        encoder = TextEncoder(hf_dir / "tokenizer.json", max_length)
        logits = pytorch_logits(load_pytorch(inputs[model_key].path), encoder, texts, batch_size, bar.update)
    else:
        check_onnx(call.key, inputs[model_key].file("model.onnx"))
        clf = OnnxClassifier(
            inputs[model_key].file("model.onnx"), hf_dir / "tokenizer.json", max_length, threads=ctx.threads
        )
        logits = clf.logits(texts, batch_size, bar.update)
    bar.close()
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
