"""The export stage: optimum's ONNX exporter, then a parity check against PyTorch on real eval rows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolchain.compile.parity import compare
from toolchain.errors import StageError

log = logging.getLogger("toolchain")


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
