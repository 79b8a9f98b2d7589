"""NNCF post-training int8 for OpenVINO: the export read by OpenVINO, calibrated on training rows with
`ModelType.TRANSFORMER` (NNCF's preset for transformer blocks: no quantization of the softmax, LayerNorm-aware
ranges), nodes named in `ignored` kept in float (NNCF's ignored scope), saved as an OpenVINO IR."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from toolchain import model_inputs
from toolchain.compile.parity import IR_MODEL
from toolchain.runtime import TextEncoder


def nncf_int8(
    graph: Path, tokenizer: Path, texts: list[str], max_length: int, out: Path, ignored: list[str] | None = None
) -> Path:
    """Quantize `graph` (ONNX) into out/model.xml (+ model.bin); returns the IR's path."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(graph))
    names = [i.get_any_name() for i in model.inputs]
    encoder = TextEncoder(tokenizer, max_length, fields=model_inputs.ENCODING_FIELD)
    rows = [encoder.encode([t]) for t in texts]  # one row per item, at its own length, as an app sends them
    dataset = nncf.Dataset(rows, lambda feeds: {k: feeds[k] for k in names})
    scope = nncf.IgnoredScope(names=list(ignored)) if ignored else None
    quantized = nncf.quantize(
        model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(rows), ignored_scope=scope
    )
    _canonical_names(quantized)
    ov.save_model(quantized, str(out / IR_MODEL))
    return out / IR_MODEL


def _canonical_names(model: Any) -> None:
    """Name the nodes OpenVINO and NNCF created after their place in the graph: their generated names count every
    node made so far in the process (Constant_52647), so the same quantization saved twice would differ, and the
    same artifact id would have two contents."""
    for i, op in enumerate(model.get_ordered_ops()):
        if re.fullmatch(r"[A-Za-z]+_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_op{i}")
