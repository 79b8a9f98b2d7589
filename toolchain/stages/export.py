"""The `export` stage. Export the fine-tuned model to ONNX (optimum) and check parity with PyTorch.

Helpers: `toolchain.compile.export`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict

from toolchain import model_inputs
from toolchain.compile.export import check_parity
from toolchain.compile.parity import REFERENCE
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.data import text_items
from toolchain.evaluate.torch_model import load_pytorch
from toolchain.recipe.schema import ExportSection
from toolchain.runtime import TextEncoder


class ExportConfig(ExportSection):
    """The recipe's `compile.export` section and the length the bundle runs at (the parity reference's)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    max_length: int


@register(
    "export",
    kind="onnx",
    help="Export the fine-tuned model to ONNX (optimum) and check parity with PyTorch.",
    config=ExportConfig,
)
def export(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from optimum.exporters.onnx import main_export

    cfg = ctx.config(ExportConfig)
    max_length = cfg.max_length
    (src_key,) = call.inputs  # the fine-tuned model, or the distilled student
    src = inputs[src_key].path
    work = out / "optimum"
    # optimum's own validation uses random inputs; ours below uses real eval rows, so skip its check.
    main_export(
        str(src),
        work,
        task="text-classification",
        opset=cfg.opset,
        device="cpu",
        do_validation=False,
        library_name="transformers",
    )
    shutil.move(work / "model.onnx", out / "model.onnx")
    shutil.rmtree(work)

    # Reference logits from PyTorch on the parity rows, fed the very arrays the ONNX runtime gets.
    texts = text_items(ctx.eval)[: cfg.parity_rows]
    feeds = TextEncoder(src / "tokenizer.json", max_length, fields=model_inputs.ENCODING_FIELD).encode(texts)
    model = load_pytorch(src)
    with torch.inference_mode():
        takes = model_inputs.select(feeds, model_inputs.forward_inputs(model))
        logits = model(**{k: torch.from_numpy(v) for k, v in takes.items()}).logits.float().numpy()
    np.savez(out / REFERENCE, logits=logits, max_length=max_length, **feeds)  # type: ignore[arg-type]
    return check_parity(out / "model.onnx", src / "tokenizer.json", out / REFERENCE, cfg.atol, ctx.threads, "export")
