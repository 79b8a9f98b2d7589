"""The `llm-quantize` stage. Weight-only MatMulNBits (4 or 8 bits, blocks) of the decoder's MatMuls.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.compile.graph import matmul_nbits
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import RunContext
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.llm.helpers import rank_projections


@register("llm-quantize", kind="onnx", help="Weight-only MatMulNBits (4 or 8 bits, blocks) of the decoder's MatMuls.")
def llm_quantize(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import onnx

    c = call.config
    src = inputs["llm-export"].file("model.onnx")
    exclude = list(c.get("exclude") or [])
    args = (c["block_size"], c["symmetric"], c["accuracy_level"])
    eight: list[str] = []
    if c.get("int8_nodes"):  # mixed precision: the named MatMuls to 8 bits first, the rest to c["bits"]
        names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
        eight = [n for n in names if any(p in n for p in c["int8_nodes"]) and n not in exclude]
        if not eight:
            raise StageError("llm-quantize", f"int8_nodes {c['int8_nodes']} match no MatMul of the exported graph")
        matmul_nbits(src, out / "mixed.onnx", *args, only=eight, bits=8)
        src = out / "mixed.onnx"
    matmul_nbits(src, out / "model.onnx", *args, None, exclude, bits=c["bits"])
    (out / "mixed.onnx").unlink(missing_ok=True)
    ranking = None
    if c.get("sensitivity"):
        ranking = rank_projections(ctx, inputs, c, out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    return {
        "bits": c["bits"],
        "matmulnbits_nodes": len(nbits),
        "int8_weight_nodes": nbits.count(8) if c["bits"] != 8 else 0,
        "int8_nodes": eight,
        "float_matmul_nodes": sum(n.op_type == "MatMul" for n in graph.node),
        "excluded": exclude,
        "size_bytes": (out / "model.onnx").stat().st_size,
        **({"sensitivity": ranking} if ranking is not None else {}),
    }
