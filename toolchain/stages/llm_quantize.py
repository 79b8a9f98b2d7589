"""The `llm-quantize` stage. Weight-only MatMulNBits (4 or 8 bits, blocks) of the decoder's MatMuls; in the fused
graph the embedding then reads the quantized LM head's weights (GatherBlockQuantized).

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from toolchain.compile.graph import matmul_nbits
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.data import read_split
from toolchain.errors import StageError
from toolchain.llm import fused
from toolchain.llm.helpers import PromptConfig, prompt_task, rank_projections


class LlmQuantizeConfig(StageConfig):
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int | None
    exclude: list[str] | None = None
    int8_nodes: list[str] | None = None
    # sensitivity ranking: the rows it reads (their hash is in the identity with the prompt and the label columns)
    sensitivity: bool = False
    auto_file: str | None = None
    auto_file_sha256: str | None = None
    sensitivity_rows: int | None = None
    text: str | None = None
    label: str | None = None


@register(
    "llm-quantize",
    kind="onnx",
    help="Weight-only MatMulNBits (4 or 8 bits, blocks) of the decoder's MatMuls.",
    config=LlmQuantizeConfig,
)
def llm_quantize(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import onnx

    c = ctx.config(LlmQuantizeConfig)
    src = inputs["llm-export"].file("model.onnx")
    exclude = list(c.exclude or [])
    args = (c.block_size, c.symmetric, c.accuracy_level)
    eight: list[str] = []
    if c.int8_nodes:  # mixed precision: the named MatMuls to 8 bits first, the rest to c.bits
        names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
        eight = [n for n in names if any(p in n for p in c.int8_nodes) and n not in exclude]
        if not eight:
            kinds = sorted({re.sub(r"layers\.\d+", "layers.N", n) for n in names})
            raise StageError(
                "llm-quantize",
                f"compile.quantize int8_nodes {c.int8_nodes} match no MatMul of the exported graph; its MatMuls: "
                f"{', '.join(kinds)}",
            )
        matmul_nbits(src, out / "mixed.onnx", *args, only=eight, bits=8)
        src = out / "mixed.onnx"
    matmul_nbits(src, out / "model.onnx", *args, None, exclude, bits=c.bits)
    (out / "mixed.onnx").unlink(missing_ok=True)
    shared = False
    if fused.is_fused(out / "model.onnx"):  # the embedding read from the quantized LM head: one table
        shared = fused.share_embedding(out / "model.onnx", out / "shared.onnx")
        (out / "shared.onnx").replace(out / "model.onnx")
    ranking = None
    if c.sensitivity:
        assert c.auto_file and c.auto_file_sha256 and c.sensitivity_rows and c.text and c.label
        task = prompt_task(PromptConfig.model_validate(call.identity))
        path = ctx.data_file(c.auto_file, c.auto_file_sha256)
        rows = read_split(path, c.text, c.label, task.labels).head(c.sensitivity_rows)
        model = inputs["llm-export"].file("model.onnx")
        ranking = rank_projections(ctx, model, inputs["llm-finetune"].path, task, rows, c, out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    return {
        "bits": c.bits,
        "matmulnbits_nodes": len(nbits),
        "int8_weight_nodes": nbits.count(8) if c.bits != 8 else 0,
        "int8_nodes": eight,
        "float_matmul_nodes": sum(n.op_type == "MatMul" for n in graph.node),
        "excluded": exclude,
        "embedding_shared_with_lm_head": shared,
        "size_bytes": (out / "model.onnx").stat().st_size,
        **({"sensitivity": ranking} if ranking is not None else {}),
    }
