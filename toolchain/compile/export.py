"""The export stage: optimum's ONNX exporter, then a parity check against PyTorch on real eval rows."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolchain.compile.parity import REFERENCE, compare
from toolchain.errors import StageError
from toolchain.evaluate.accuracy import load_pytorch
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register
from toolchain.runtime import TextEncoder

log = logging.getLogger("toolchain")


@register("export", kind="onnx", help="Export the fine-tuned model to ONNX (optimum) and check parity with PyTorch.")
def export(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from optimum.exporters.onnx import main_export

    cfg = ctx.recipe.compile.export
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
    max_length = ctx.recipe.bundle.max_length
    texts = ctx.eval.texts[: cfg.parity_rows]
    feeds = TextEncoder(src / "tokenizer.json", max_length).encode(texts)
    model = load_pytorch(src)
    with torch.inference_mode():
        logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.float().numpy()
    np.savez(out / REFERENCE, logits=logits, max_length=max_length, **feeds)
    return check_parity(out / "model.onnx", src / "tokenizer.json", out / REFERENCE, cfg.atol, ctx.threads, "export")


def check_parity(
    model: Path, tokenizer: Path, reference: Path, atol: float, threads: int, stage: str
) -> dict[str, Any]:
    """Compare against the PyTorch logits; raise StageError with the measured difference beyond `atol`."""
    parity = compare(model, tokenizer, reference, threads)
    log.info(
        "%s: parity with PyTorch on %d eval rows: max |diff| %.2e (tolerance %.0e), argmax agreement %.4f",
        stage,
        parity["rows"],
        parity["max_abs_diff"],
        atol,
        parity["argmax_agreement"],
    )
    if not parity["max_abs_diff"] <= atol:
        raise StageError(
            stage,
            f"ONNX logits differ from PyTorch by {parity['max_abs_diff']:.3e} on "
            f"{parity['rows']} eval rows, more than compile.export.atol={atol:.0e}. "
            "Raise the tolerance only if the difference is understood.",
        )
    return {"parity": parity, "atol": atol}
