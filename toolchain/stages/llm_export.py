"""The `llm-export` stage. The decoder as ONNX with its KV cache: the toolchain's fused graph (toolchain.llm.fused)
or optimum's export; parity with PyTorch over the prompt and decode steps.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.llm import fused
from toolchain.llm.export import decode_parity, export_with_past
from toolchain.llm.helpers import PromptConfig, load_tokenizer, prompt_task

log = logging.getLogger("toolchain")


class LlmExportConfig(PromptConfig):
    opset: int
    atol: float  # largest allowed |ONNX - PyTorch| logit difference over the prompt and the decode steps
    parity_steps: int  # greedy decode steps compared
    graph: str = "auto"  # fused | optimum | auto (fused where the model type is covered)


@register(
    "llm-export",
    kind="onnx",
    help="ONNX with its KV cache (the fused graph or optimum's); parity over the prompt and decode steps.",
    config=LlmExportConfig,
)
def llm_export(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = ctx.config(LlmExportConfig)
    src = inputs["llm-finetune"].path
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reason = fused.supports(model.config) if cfg.graph != "optimum" else "generation.graph: optimum"
    if reason is None:
        positions = min(int(getattr(model.config, "max_position_embeddings", 0) or 8192), 8192)
        graph = fused.build(model, out, max_positions=positions, opset=cfg.opset)
        onnx_path = out / "model.onnx"
        log.info("llm-export: the fused decoder graph (%s)", ", ".join(f"{k} {v}" for k, v in graph["ops"].items()))
    elif cfg.graph == "fused":
        raise StageError(
            "llm-export",
            f"generation.graph is 'fused' but the fused graph does not cover this model: {reason}; set it to "
            "'auto' or 'optimum'",
        )
    else:
        log.info("llm-export: optimum's export (no fused graph: %s)", reason)
        onnx_path = export_with_past(src, out, opset=cfg.opset)
        graph = {"graph": "optimum", "why": reason}
    tokenizer = load_tokenizer(src)
    task = prompt_task(cfg)
    prompt_ids = tokenizer(task.prompt(tokenizer, ctx.eval.texts[0]), add_special_tokens=False)["input_ids"]
    parity = decode_parity(model, onnx_path, prompt_ids, steps=cfg.parity_steps)
    log.info(
        "llm-export: parity over the prompt (%d tokens) and %d decode steps: max |diff| %.2e (tolerance %.0e), "
        "greedy tokens agree: %s",
        len(prompt_ids),
        parity["steps"],
        parity["max_abs_diff"],
        cfg.atol,
        parity["greedy_agree"],
    )
    if parity["max_abs_diff"] > cfg.atol or not parity["greedy_agree"]:
        raise StageError(
            "llm-export",
            f"ONNX logits differ from PyTorch by {parity['max_abs_diff']:.2e} (compile.export.atol "
            f"{cfg.atol:.0e}) or the greedy tokens differ ({parity['greedy_agree']}) over "
            f"{parity['steps']} decode steps",
        )
    return {
        "parity": parity,
        "size_bytes": onnx_path.stat().st_size,
        "prompt_tokens": len(prompt_ids),
        "graph": graph,
    }
