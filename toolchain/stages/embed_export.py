"""The `embed-export` stage. Export the embedder to ONNX with its pooling and normalization inside the graph (token
ids in, one unit vector per text out) and check parity with PyTorch on real eval texts.

Helpers: `toolchain.embed.model`, `toolchain.compile.export`."""

from __future__ import annotations

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
from toolchain.embed.model import load_embedder
from toolchain.runtime import TextEncoder
from toolchain.stages.export import ExportConfig

OUTPUT = "embeddings"  # the graph's one output: (batch, dimension) float32


@register(
    "embed-export",
    kind="onnx",
    help="Export the embedder (encoder, mean pooling, L2 normalization) to one ONNX graph and check parity with "
    "PyTorch on eval texts.",
    config=ExportConfig,
)
def embed_export(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(ExportConfig)
    (src_key,) = call.inputs
    src = inputs[src_key].path
    model = load_embedder(src)
    names = model.input_names
    texts = ctx.eval.texts[: cfg.parity_rows]
    feeds = TextEncoder(src / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD).encode(texts)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    with torch.inference_mode():
        reference = model(*args).numpy()
    axes = {0: "batch_size", 1: "sequence_length"}
    torch.onnx.export(
        model,
        args,
        str(out / "model.onnx"),
        input_names=names,
        output_names=[OUTPUT],
        dynamic_axes={**dict.fromkeys(names, axes), OUTPUT: {0: "batch_size"}},
        opset_version=cfg.opset,
        dynamo=False,
    )
    # the reference is stored under `logits`, the key the later stages' parity and drift checks read
    np.savez(out / REFERENCE, logits=reference, max_length=cfg.max_length, **feeds)  # type: ignore[arg-type]
    return check_parity(
        out / "model.onnx", src / "tokenizer.json", out / REFERENCE, cfg.atol, ctx.threads, "embed-export"
    )
