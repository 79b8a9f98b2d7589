"""The quantize stage: onnxruntime's dynamic int8 quantization of the (fused) fp32 graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.compile.parity import REFERENCE, compare
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.recipe import QuantizeSpec
from toolchain.registry import register


@register("quantize", kind="onnx-int8", help="Quantize weights to int8 (onnxruntime.quantization, dynamic).")
def quantize(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    spec = QuantizeSpec.model_validate(call.config)
    (src,) = inputs.values()
    quantize_dynamic(
        src.file("model.onnx"),
        out / "model.onnx",
        per_channel=spec.per_channel,
        reduce_range=spec.reduce_range,
        op_types_to_quantize=spec.op_types,
        weight_type=QuantType.QInt8,
        # The ORT transformer optimizer leaves some weights without a recorded type; without a default the
        # quantizer fails with "Unable to find data type for weight_name".
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    reference = ctx.artifacts["export"].file(REFERENCE)
    drift = compare(out / "model.onnx", ctx.artifacts["finetune"].file("tokenizer.json"), reference, ctx.threads)
    quantized = sum(
        1
        for n in onnx.load(str(out / "model.onnx")).graph.node
        if n.op_type.startswith(("MatMulInteger", "DynamicQuantize", "QLinear", "QAttention"))
    )
    return {"mode": spec.mode, "per_channel": spec.per_channel, "drift_vs_pytorch": drift, "quantized_nodes": quantized}
