"""The `llm-base` stage. The base decoder (GGUF dequantized, or a folder) saved as fp32.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.llm.export import load_causal_lm
from toolchain.llm.helpers import save_model, stop_token_ids
from toolchain.models import gguf_file, resolve_source
from toolchain.recipe.schema import ModelSection


class LlmBaseConfig(StageConfig):
    model: dict[str, str]  # the source's identity (hashed)
    access: ModelSection  # where it is and what loading it may do


@register(
    "llm-base",
    kind="hf-model",
    help="The base decoder (GGUF dequantized, or a folder) saved as fp32.",
    config=LlmBaseConfig,
)
def llm_base(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(LlmBaseConfig)
    folder = resolve_source(cfg.model["source"], cfg.access)
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
