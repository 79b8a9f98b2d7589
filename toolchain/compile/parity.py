"""Parity of an ONNX graph with the PyTorch model it came from, on real eval rows.

The export stage stores the PyTorch logits for the parity rows next to the ONNX file; later stages compare against
those same numbers without loading torch again."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain import model_inputs
from toolchain.errors import StageError
from toolchain.runtime import make_classifier

REFERENCE = "parity_reference.npz"
IR_MODEL = "model.xml"  # an OpenVINO IR's graph; its weights are model.bin beside it


def export_key(inputs: tuple[str, ...]) -> str:
    """Which of a stage's inputs is the export whose PyTorch reference it compares against: `export`, or a second
    export (`export.student`, `export.teacher`) of a recipe that exports two models."""
    return next(k for k in inputs if k == "export" or k.startswith("export."))


def graph_file(folder: Path) -> Path:
    """The model file of a graph artifact: its OpenVINO IR when it has one, else its model.onnx."""
    return folder / IR_MODEL if (folder / IR_MODEL).is_file() else folder / "model.onnx"


def graph_bytes(path: Path) -> int:
    """Bytes of a graph file and the weights beside it (an IR's model.bin)."""
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (weights.stat().st_size if weights is not None and weights.is_file() else 0)


def check_onnx(stage: str, path: Path) -> None:
    """onnx.checker on a graph before the toolchain runs it: a malformed or truncated file is an error naming it,
    not an onnxruntime crash (artifacts are also hash-checked, so this catches what a stage itself wrote wrong)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(stage, f"{path} is not a valid ONNX model ({first}); rerun with --force {stage}") from None


def compare(
    model_path: Path, tokenizer_file: Path, reference: Path, threads: int, runtime: str = "onnxruntime"
) -> dict[str, float]:
    """Max |logit difference| and argmax agreement of a model (run by `runtime`, at its default precision) against
    the stored PyTorch logits."""
    ref = np.load(reference)
    clf = make_classifier(
        runtime, model_path, tokenizer_file, int(ref["max_length"]), threads, fields=model_inputs.ENCODING_FIELD
    )
    feeds = {k: ref[k] for k in model_inputs.TEXT_INPUTS if k in ref.files}
    got = clf.run(feeds)
    want = ref["logits"]
    return {
        "max_abs_diff": float(np.abs(got - want).max()),
        "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "rows": len(want),
    }
