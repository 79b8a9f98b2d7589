"""The quantize stage, one variant per recipe entry.

- static-int8: onnxruntime's static QDQ quantization, activation ranges calibrated on training rows.
- int4: onnxruntime's MatMulNBits weight-only quantization (block-wise 4-bit weights, float activations).
- dynamic-int8: onnxruntime's dynamic quantization of the (fused) fp32 graph: int8 weights, activation ranges
  computed at run time.
- qat-qdq: the graph exported from quantization-aware training, with the learned scales kept as they are
  (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels). It is never re-quantized.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from toolchain.compile.parity import REFERENCE, compare
from toolchain.errors import StageError
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.recipe import QuantizeSpec
from toolchain.registry import register

log = logging.getLogger("toolchain")


def matmul_input_sources(graph: Any) -> dict[str, tuple[str | None, str | None]]:
    """For each MatMul/Gemm node: the ops behind its two inputs, looking through layout-only ops."""
    producers = {o: n for n in graph.node for o in n.output}

    def source(name: str) -> str | None:
        node = producers.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Identity"):
            node = producers.get(node.input[0])
        return node.op_type if node is not None else None

    return {n.name: (source(n.input[0]), source(n.input[1])) for n in graph.node if n.op_type in ("MatMul", "Gemm")}


def qdq_coverage(model_path: Path) -> dict[str, int]:
    """How many MatMul/Gemm nodes take both inputs from DequantizeLinear (int8 kernels once ORT fuses them)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    sources = matmul_input_sources(graph).values()
    matmuls = list(sources)
    covered = [s for s in sources if s == ("DequantizeLinear", "DequantizeLinear")]
    linear = [s for s in sources if s[1] == "DequantizeLinear"]
    return {
        "matmuls": len(matmuls),
        "matmuls_with_qdq_inputs": len(covered),
        "matmuls_with_qdq_weights": len(linear),
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in graph.node),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in graph.node),
    }


def _dynamic(spec: QuantizeSpec, src: Path, out: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        out,
        per_channel=spec.per_channel,
        reduce_range=spec.reduce_range,
        op_types_to_quantize=spec.op_types,
        weight_type=QuantType.QInt8,
        # The ORT transformer optimizer leaves some weights without a recorded type; without a default the
        # quantizer fails with "Unable to find data type for weight_name".
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    graph = onnx.load(str(out)).graph
    return {
        "quantized_nodes": sum(
            n.op_type in ("MatMulInteger", "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeMatMul")
            for n in graph.node
        )
    }


class _CalibrationRows(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over real training rows, one row per call, all padded to one length
    (the calibrators stack activations across calls, so shapes must agree)."""

    def __init__(self, tokenizer: Path, texts: list[str], length: int, input_names: list[str]):
        from toolchain.runtime import TextEncoder

        encoder = TextEncoder(tokenizer, length)
        self.rows = []
        for text in texts:
            feeds = encoder.encode([text])
            pad = length - feeds["input_ids"].shape[1]
            self.rows.append(
                {
                    k: np.pad(v, ((0, 0), (0, pad)), constant_values=encoder.pad_id if k == "input_ids" else 0)
                    for k, v in feeds.items()
                    if k in input_names
                }
            )
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.rows):
            return None
        self.position += 1
        return self.rows[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def _static(ctx: RunContext, spec: QuantizeSpec, src: Path, out: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quant_pre_process

    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    texts = ctx.train.sample(spec.calibration_rows, seed=ctx.recipe.finetune.seed + 1).texts
    reader = _CalibrationRows(ctx.artifacts["finetune"].file("tokenizer.json"), texts, spec.calibration_length, names)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[spec.calibration_method]
    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference first, or the quantizer cannot type the activations and leaves them in float.
        # skip_symbolic_shape: symbolic inference fails on optimum's export ("Incomplete symbolic shape inference").
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True, skip_optimization=False)
        _quantize_static(prepared, out, reader, spec, method)
    return {"calibration_rows": len(texts), "calibration_method": spec.calibration_method}


def _quantize_static(src: Path, out: Path, reader: CalibrationDataReader, spec: QuantizeSpec, method: Any) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        src,
        out,
        reader,
        quant_format=QuantFormat.QDQ,
        # The default op types ruin BERT-class accuracy (../shared/ENVIRONMENT.md), and the pooler's Gemm has no
        # calibrated input range after the fused graph's Gather: MatMul only unless the recipe says otherwise.
        op_types_to_quantize=spec.op_types or ["MatMul"],
        per_channel=spec.per_channel,
        reduce_range=spec.reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        calibration_cache_path=None,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "CalibTensorRangeSymmetric": False},
    )


def _int4(spec: QuantizeSpec, src: Path, out: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)),
        block_size=spec.block_size,
        is_symmetric=spec.symmetric,
        accuracy_level=spec.accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    nodes = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(out)).graph.node)
    return {"matmul_nbits": nodes, "block_size": spec.block_size, "accuracy_level": spec.accuracy_level}


def _qat(ctx: RunContext, spec: QuantizeSpec, finetune: Artifact, out: Path) -> dict[str, Any]:
    """Rebuild the fake-quant model from the finetune artifact, export its Q/DQ graph, check it against PyTorch."""
    from safetensors.torch import load_file

    from toolchain.compile.parity import compare
    from toolchain.finetune import qat
    from toolchain.finetune.stage import QAT_STATE
    from toolchain.runtime import TextEncoder

    recipe = ctx.recipe
    cfg = recipe.finetune
    assert cfg.qat is not None
    model = qat.load(finetune.path, recipe.data.labels, cfg)
    missing, unexpected = model.load_state_dict(load_file(str(finetune.file(QAT_STATE))), strict=False)
    if missing or unexpected:
        raise StageError(
            "quantize", f"QAT state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    feeds = TextEncoder(finetune.file("tokenizer.json"), recipe.bundle.max_length).encode(
        ctx.eval.texts[: recipe.compile.export.parity_rows]
    )
    qat.export_qdq(model, out, {**feeds, "max_length": recipe.bundle.max_length}, recipe.compile.export.opset)
    (out / qat.QDQ_MODEL).rename(out / "model.onnx")
    folded = qat.fold_weight_quantization(out / "model.onnx")
    parity = compare(out / "model.onnx", finetune.file("tokenizer.json"), out / qat.QDQ_REFERENCE, ctx.threads)
    log.info(
        "quantize: QAT Q/DQ graph vs PyTorch fake-quant on %d eval rows: max |diff| %.3e (tolerance %.0e), "
        "argmax agreement %.4f",
        parity["rows"],
        parity["max_abs_diff"],
        spec.atol,
        parity["argmax_agreement"],
    )
    if not parity["max_abs_diff"] <= spec.atol:
        raise StageError(
            "quantize",
            f"the QAT ONNX graph differs from the PyTorch fake-quant model by "
            f"{parity['max_abs_diff']:.3e}, more than compile.quantize[].atol={spec.atol}",
        )
    return {"parity_vs_fake_quant": parity, "atol": spec.atol, "int8_weights": folded}


@register(
    "quantize",
    kind="onnx-quantized",
    help="Quantize: dynamic int8, static int8 (calibrated QDQ), int4 weight-only, or keep a QAT Q/DQ export.",
    version=2,
)
def quantize(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    spec = QuantizeSpec.model_validate(call.config)
    (src,) = inputs.values()
    if spec.mode == "qat-qdq":
        meta = _qat(ctx, spec, src, out)
    elif spec.mode == "static-int8":
        meta = _static(ctx, spec, src.file("model.onnx"), out / "model.onnx")
    elif spec.mode == "int4":
        meta = _int4(spec, src.file("model.onnx"), out / "model.onnx")
    else:
        meta = _dynamic(spec, src.file("model.onnx"), out / "model.onnx")
    reference = ctx.artifacts["export"].file(REFERENCE)
    drift = compare(out / "model.onnx", ctx.artifacts["finetune"].file("tokenizer.json"), reference, ctx.threads)
    return {"mode": spec.mode, **meta, "drift_vs_pytorch": drift, "qdq": qdq_coverage(out / "model.onnx")}
