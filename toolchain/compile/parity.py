"""Parity of an ONNX graph with the PyTorch model it came from, on real eval rows.

The export stage stores the PyTorch logits for the parity rows next to the ONNX file; later stages compare against
those same numbers without loading torch again."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import StageError
from toolchain.runtime import OnnxClassifier

REFERENCE = "parity_reference.npz"


def check_onnx(stage: str, path: Path) -> None:
    """onnx.checker on a graph before the toolchain runs it: a malformed or truncated file is an error naming it,
    not an onnxruntime crash (artifacts are also hash-checked, so this catches what a stage itself wrote wrong)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(stage, f"{path} is not a valid ONNX model ({first}); rerun with --force {stage}") from None


def compare(model_path: Path, tokenizer_file: Path, reference: Path, threads: int) -> dict[str, float]:
    """Max |logit difference| and argmax agreement of an ONNX model against the stored PyTorch logits."""
    ref = np.load(reference)
    clf = OnnxClassifier(model_path, tokenizer_file, max_length=int(ref["max_length"]), threads=threads)
    feeds = {k: ref[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    got = clf.run(feeds)
    want = ref["logits"]
    return {
        "max_abs_diff": float(np.abs(got - want).max()),
        "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "rows": len(want),
    }
