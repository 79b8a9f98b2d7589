"""The `quantize` stage. Quantize: dynamic int8, static int8 (calibrated QDQ), int4 weight-only, fp16, or keep a QAT
Q/DQ export; optionally rank nodes by sensitivity and keep the worst in float.

Helpers: `toolchain.compile.quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.compile.graph import qdq_coverage
from toolchain.compile.openvino import nncf_int8
from toolchain.compile.parity import REFERENCE, compare, export_key, graph_file
from toolchain.compile.quantize import QuantizeConfig, build_variant, qat_variant
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register


@register(
    "quantize",
    kind="onnx-quantized",
    help="Quantize: dynamic int8, static int8 (calibrated QDQ), int4 weight-only, fp16, or keep a QAT Q/DQ export; "
    "optionally rank nodes by sensitivity and keep the worst in float.",
    version=5,  # 4: exclude auto targets the flip rate; 5: int4 rankings quantize one node at a time (`only` fixed)
    config=QuantizeConfig,
)
def quantize(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    spec = ctx.config(QuantizeConfig)
    src = inputs[call.inputs[0]]  # the graph it starts from (the finetune artifact for qat-qdq)
    tokenizer = inputs["finetune"].file("tokenizer.json")
    runtime = "onnxruntime"
    if spec.mode == "qat-qdq":
        meta = qat_variant(ctx, spec, src, out)
    elif spec.mode == "nncf-int8":
        texts = ctx.train.sample(spec.calibration_rows, seed=spec.seed + 1).texts
        ignored = spec.exclude if isinstance(spec.exclude, list) else None
        nncf_int8(src.file("model.onnx"), tokenizer, texts, spec.max_length, out, ignored)
        meta, runtime = {"calibration_rows": len(texts), "excluded": spec.exclude or []}, "openvino"
    else:
        meta = build_variant(ctx, spec, src.file("model.onnx"), out, tokenizer)
    # drift against the PyTorch reference logits the export computed, through the runtime that runs the variant
    graph = graph_file(out)
    reference = inputs[export_key(call.inputs)].file(REFERENCE)
    drift = compare(graph, tokenizer, reference, ctx.threads, runtime=runtime)
    coverage = qdq_coverage(graph) if graph.suffix == ".onnx" else None
    return {"mode": spec.mode, **meta, "drift_vs_pytorch": drift, "qdq": coverage}
