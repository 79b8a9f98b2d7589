"""Parity of an ONNX graph with the PyTorch model it came from, on real eval rows.

The export stage stores the PyTorch logits for the parity rows next to the ONNX file; later stages compare against
those same numbers without loading torch again."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.runtime import OnnxClassifier

REFERENCE = "parity_reference.npz"


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
