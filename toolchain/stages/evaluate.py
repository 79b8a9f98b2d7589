"""The evaluate stage: one variant's predictions and accuracy on the whole eval split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from toolchain import model_inputs
from toolchain.compile.parity import check_onnx, graph_file
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.evaluate.torch_model import load_pytorch, pytorch_logits
from toolchain.runtime import TextEncoder, make_classifier, openvino_hint, softmax

PYTORCH_BATCH = 32


class EvaluateConfig(StageConfig):
    variant: str
    format: str  # pytorch | onnx | openvino
    precision: str | None = None  # openvino: the precision it runs at (its INFERENCE_PRECISION_HINT)
    max_length: int  # tokens per text, as the bundle runs it
    batch_size: int
    # openvino: the sequence lengths it runs at (bundle.shape_buckets), as the bundle does
    buckets: list[int] = Field(default_factory=list)


@register(
    "evaluate",
    kind="metrics",
    help="Accuracy and per-row predictions of one variant on the eval split.",
    # 2: CPU sessions keep Add + LayerNormalization unfused (runtime.CPU_SESSION_CONFIG); PyTorch rows 32 at a time
    version=2,
    config=EvaluateConfig,
)
def evaluate(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(EvaluateConfig)
    texts, labels = ctx.eval.texts, ctx.eval.labels
    max_length, batch_size = cfg.max_length, cfg.batch_size
    hf_dir = inputs["finetune"].path
    bar = tqdm(total=len(texts), desc=call.key, unit="row", mininterval=2.0)
    model_key = call.inputs[0]  # the variant's own artifact (the teacher's for pytorch-fp32)
    if cfg.format == "pytorch":
        # fp32 PyTorch's logits do not depend on what shares a batch (padding is masked), unlike a dynamically
        # quantized graph's: its rows are scored PYTORCH_BATCH at a time, by length, whatever the recipe's batch
        encoder = TextEncoder(hf_dir / "tokenizer.json", max_length, fields=model_inputs.ENCODING_FIELD)
        model = load_pytorch(inputs[model_key].path)
        logits = pytorch_logits(model, encoder, texts, max(batch_size, PYTORCH_BATCH), bar.update)
    else:
        graph = graph_file(inputs[model_key].path)
        if graph.suffix == ".onnx":
            check_onnx(call.key, graph)
        runtime = "openvino" if cfg.format == "openvino" else "onnxruntime"
        hint = openvino_hint(cfg.precision or "") if runtime == "openvino" else None
        clf = make_classifier(
            runtime,
            graph,
            hf_dir / "tokenizer.json",
            max_length,
            ctx.threads,
            precision=hint,
            fields=model_inputs.ENCODING_FIELD,
            buckets=cfg.buckets,
        )
        logits = clf.logits(texts, batch_size, bar.update)
    bar.close()
    probs = softmax(logits)
    pred = probs.argmax(-1)
    correct = int((pred == labels).sum())
    np.save(out / "logits.npy", logits)
    metrics = {
        "variant": cfg.variant,
        "rows": len(labels),
        "correct": correct,
        "accuracy": correct / len(labels),
        "predictions": pred.tolist(),
        "confidences": [round(float(p), 6) for p in probs.max(-1)],
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    return {"variant": metrics["variant"], "accuracy": metrics["accuracy"], "rows": metrics["rows"]}
