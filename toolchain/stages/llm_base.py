"""The `llm-base` stage. The base decoder (GGUF dequantized, or a folder) saved as fp32.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import RunContext
from toolchain.core.registry import register
from toolchain.llm.export import load_causal_lm
from toolchain.llm.helpers import save_model, stop_token_ids
from toolchain.models import gguf_file, resolve_source


@register("llm-base", kind="hf-model", help="The base decoder (GGUF dequantized, or a folder) saved as fp32.")
def llm_base(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:

    folder = resolve_source(ctx.recipe.model.source, ctx.recipe.model)
    gguf = gguf_file(folder)
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(folder, gguf)
    seconds = time.perf_counter() - t0
    save_model(model, tokenizer, out)
    return {
        "source_file": gguf or str(folder),
        "load_seconds": round(seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "stop_token_ids": stop_token_ids(tokenizer),
    }
