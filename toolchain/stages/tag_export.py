"""The `tag-export` stage. Export the token classifier to ONNX (optimum, task token-classification) and check parity
with PyTorch on eval sentences fed word by word, as the evaluation and the Tagger feed them.

Helpers: `toolchain.compile.export`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolchain import model_inputs
from toolchain.compile.export import check_parity
from toolchain.compile.parity import REFERENCE
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.evaluate.torch_model import load_pytorch
from toolchain.runtime import TextEncoder, encode_words
from toolchain.stages.export import ExportConfig


@register(
    "tag-export",
    kind="onnx",
    help="Export the token classifier to ONNX (optimum) and check parity with PyTorch on eval sentences.",
    config=ExportConfig,
)
def tag_export(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from optimum.exporters.onnx import main_export

    cfg = ctx.config(ExportConfig)
    src = inputs["finetune"].path
    work = out / "optimum"
    main_export(
        str(src),
        work,
        task="token-classification",
        opset=cfg.opset,
        device="cpu",
        do_validation=False,
        library_name="transformers",
    )
    shutil.move(work / "model.onnx", out / "model.onnx")
    shutil.rmtree(work)
    words = ctx.eval.words
    assert words is not None
    encoder = TextEncoder(src / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD)
    feeds, _ = encode_words(encoder, [w for w in words[: cfg.parity_rows] if w])
    model = load_pytorch(src)
    with torch.inference_mode():
        takes = model_inputs.select(feeds, model_inputs.forward_inputs(model))
        logits = model(**{k: torch.from_numpy(v) for k, v in takes.items()}).logits.float().numpy()
    np.savez(out / REFERENCE, logits=logits, max_length=cfg.max_length, **feeds)  # type: ignore[arg-type]
    return check_parity(
        out / "model.onnx", src / "tokenizer.json", out / REFERENCE, cfg.atol, ctx.threads, "tag-export"
    )
