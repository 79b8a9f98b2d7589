"""ONNX graph helpers the quantizers share: which inputs each MatMul reads, how much of a graph Q/DQ covers,
onnxruntime's MatMulNBits weight-only quantizer restricted to chosen nodes (int4/int8 for encoders and decoders), and
the tanh approximation of the fused graph's GELU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.errors import StageError


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


def matmul_nbits(
    src: Path,
    out: Path,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int | None = 4,
    only: list[str] | None = None,
    exclude: list[str] | None = None,
    bits: int = 4,
) -> None:
    """onnxruntime's MatMulNBits quantizer on every MatMul with a constant weight (or `only`, less `exclude`);
    `bits` 4 or 8."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    skip = set(exclude or [])
    if only is not None:
        # onnxruntime's nodes_to_include adds nodes to op_types_to_quantize, it does not restrict them: restrict by
        # excluding every other MatMul
        keep = set(only)
        skip |= {n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in keep}
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=sorted(skip),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def approximate_gelu(src: Path, out: Path) -> tuple[Path, int]:
    """The graph with onnxruntime's fused Gelu and BiasGelu nodes as FastGelu (tanh approximation; BiasGelu's bias
    carried over as FastGelu's optional second input); the count rewritten."""
    import onnx

    model = onnx.load(str(src))
    nodes = [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in ("Gelu", "BiasGelu")]
    if not nodes:
        raise StageError("quantize", f"gelu_approximation: {src} has no fused Gelu or BiasGelu node to approximate")
    for node in nodes:
        node.op_type = "FastGelu"
    onnx.save(model, str(out))
    return out, len(nodes)
