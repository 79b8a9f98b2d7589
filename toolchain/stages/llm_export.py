"""The `llm-export` stage. ONNX with past key/values (optimum); parity over the prompt and decode steps.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import RunContext
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.llm.export import decode_parity, export_with_past
from toolchain.llm.helpers import load_tokenizer, prompt_task

log = logging.getLogger("toolchain")


@register(
    "llm-export", kind="onnx", help="ONNX with past key/values (optimum); parity over the prompt and decode steps."
)
def llm_export(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    src = inputs["llm-finetune"].path
    onnx_path = export_with_past(src, out, opset=call.config["opset"])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(src)
    task = prompt_task(ctx)
    prompt_ids = tokenizer(task.prompt(tokenizer, ctx.eval.texts[0]), add_special_tokens=False)["input_ids"]
    parity = decode_parity(model, onnx_path, prompt_ids, steps=call.config["parity_steps"])
    log.info(
        "llm-export: parity over the prompt (%d tokens) and %d decode steps: max |diff| %.2e (tolerance %.0e), "
        "greedy tokens agree: %s",
        len(prompt_ids),
        parity["steps"],
        parity["max_abs_diff"],
        call.config["atol"],
        parity["greedy_agree"],
    )
    if parity["max_abs_diff"] > call.config["atol"] or not parity["greedy_agree"]:
        raise StageError(
            "llm-export",
            f"ONNX logits differ from PyTorch by {parity['max_abs_diff']:.2e} (compile.export.atol "
            f"{call.config['atol']:.0e}) or the greedy tokens differ ({parity['greedy_agree']}) over "
            f"{parity['steps']} decode steps",
        )
    return {"parity": parity, "size_bytes": onnx_path.stat().st_size, "prompt_tokens": len(prompt_ids)}
