"""The `llm-quantize` stage. Weight-only MatMulNBits (4 or 8 bits, blocks) of the decoder's MatMuls; in the fused
graph the embedding then reads the quantized LM head's weights (GatherBlockQuantized).

With `awq`, the fp32 weights are first scaled and clipped activation-aware (`toolchain.llm.awq`); with `gptq`, the
decoder layers' 4-bit weights are rounded with error compensation (`toolchain.llm.gptq`) instead of to nearest.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.compile.graph import matmul_nbits
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.data import read_split
from toolchain.errors import StageError
from toolchain.llm import awq, fused, gptq
from toolchain.llm.helpers import PromptConfig, load_tokenizer, prompt_task, rank_projections

log = logging.getLogger("toolchain")


class LlmQuantizeConfig(StageConfig):
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int | None
    exclude: list[str] | None = None
    int8_nodes: list[str] | None = None
    lm_head_block_size: int | None = None
    awq: bool = False  # activation-aware scaling first, calibrated on the first calibration_rows training prompts
    gptq: bool = False  # the layers' 4-bit weights rounded with error compensation, calibrated on the same prompts
    calibration_rows: int | None = None
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
    scaled = compensated = None
    prompts = calibration_prompts(ctx, call, inputs, src, c) if c.awq or c.gptq else []
    if c.awq:  # the fp32 weights scaled (the same function), then quantized like any
        scaled = activation_aware(src, out / "awq.onnx", prompts, c)
        src = out / "awq.onnx"
    if c.lm_head_block_size and c.lm_head_block_size != c.block_size:  # the head first, at its own block size
        heads = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
        heads = [n for n in heads if n.startswith("/lm_head/") and n not in exclude]
        if not heads:
            raise StageError("llm-quantize", "compile.quantize lm_head_block_size: the graph has no /lm_head/ MatMul")
        matmul_nbits(src, out / "head.onnx", c.lm_head_block_size, c.symmetric, c.accuracy_level, heads, bits=c.bits)
        src = out / "head.onnx"
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
    if c.gptq:  # the layers' remaining float projections, error-compensated; the head (if still float) below
        compensated = error_compensated(src, out / "gptq.onnx", prompts, c)
        src = out / "gptq.onnx"
    matmul_nbits(src, out / "model.onnx", *args, None, exclude, bits=c.bits)
    (out / "mixed.onnx").unlink(missing_ok=True)
    for scratch in ("awq.onnx", "head.onnx", "gptq.onnx"):
        (out / scratch).unlink(missing_ok=True)
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
        "block_size": c.block_size,
        "lm_head_block_size": c.lm_head_block_size or c.block_size,
        "float_matmul_nodes": sum(n.op_type == "MatMul" for n in graph.node),
        "excluded": exclude,
        "embedding_shared_with_lm_head": shared,
        "size_bytes": (out / "model.onnx").stat().st_size,
        **({"sensitivity": ranking} if ranking is not None else {}),
        **({"awq": scaled} if scaled is not None else {}),
        **({"gptq": compensated} if compensated is not None else {}),
    }


def calibration_prompts(
    ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], src: Path, c: LlmQuantizeConfig
) -> list[list[int]]:
    """The tuned model's own prompts and answers, token ids, of the first `calibration_rows` training rows: what AWQ
    and GPTQ calibrate on. Both work on the toolchain's fused graph only."""
    if not fused.is_fused(src):
        what = "awq" if c.awq else "gptq"
        raise StageError(
            "llm-quantize",
            f"compile.quantize {what} needs the toolchain's fused decoder graph, and this model was exported with "
            f"optimum's (generation.graph, or a model type the fused graph does not cover): remove {what}",
        )
    assert c.calibration_rows
    task = prompt_task(PromptConfig.model_validate(call.identity))
    tokenizer = load_tokenizer(inputs["llm-finetune"].path)
    rows = ctx.train.head(c.calibration_rows)
    return [
        tokenizer(task.prompt(tokenizer, t) + task.answer(tokenizer, int(y)), add_special_tokens=False)["input_ids"]
        for t, y in zip(rows.texts, rows.labels, strict=True)
    ]


def activation_aware(src: Path, out: Path, prompts: list[list[int]], c: LlmQuantizeConfig) -> dict[str, Any]:
    """`src` with AWQ-scaled weights written to `out`; returns what the search chose and the errors it measured."""
    report = awq.apply(src, out, prompts, c.block_size)
    rtn, scaled = (np.mean(list(report[k].values())) for k in ("error_rtn", "error_awq"))
    log.info(
        "llm-quantize: awq on %d prompts: relative output error of the 4-bit projections %.4f -> %.4f",
        len(prompts),
        rtn,
        scaled,
    )
    return {
        "calibration_prompts": len(prompts),
        "mean_relative_error_rtn": float(rtn),
        "mean_relative_error_awq": float(scaled),
        "projections": [  # per projection: the scale exponent chosen and the output error before and after
            {"node": n, "alpha": a, "error_rtn": report["error_rtn"][n], "error_awq": report["error_awq"][n]}
            for n, a in report["alpha"].items()
        ],
    }


def error_compensated(src: Path, out: Path, prompts: list[list[int]], c: LlmQuantizeConfig) -> dict[str, Any]:
    """`src` with the decoder layers' float projections (not excluded) as GPTQ 4-bit MatMulNBits, written to `out`;
    returns the output errors it measured."""
    errors = gptq.apply(src, out, prompts, c.block_size, c.accuracy_level, set(c.exclude or []))
    rtn, compensated = (float(np.mean([e[k] for e in errors.values()])) for k in ("rtn", "gptq"))
    log.info(
        "llm-quantize: gptq on %d prompts, %d projections: relative output error %.5f rounded -> %.5f",
        len(prompts),
        len(errors),
        rtn,
        compensated,
    )
    return {
        "calibration_prompts": len(prompts),
        "projections": len(errors),
        "mean_relative_error_rtn": rtn,
        "mean_relative_error_gptq": compensated,
    }
