"""The OpenVINO/NNCF peer: the int8 model an OpenVINO user makes from the same weights with NNCF's documented
post-training path, measured beside ours and never shipped.

`nncf.quantize(ov_model, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER)` on the fp32 export read by
OpenVINO, calibrated on 300 training rows (NNCF's default subset size), nothing else tuned; saved as an OpenVINO IR
(model.xml + model.bin), which the evaluate and bench stages run with OpenVINO at its default precision for this CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolchain.compile.openvino import nncf_int8
from toolchain.compile.parity import REFERENCE, compare
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register

log = logging.getLogger("toolchain")


class NncfBaselineConfig(StageConfig):
    rows: int  # training rows NNCF calibrates on
    max_length: int  # tokens per calibration row, as the bundle runs
    seed: int  # of the calibration sample


@register(
    "openvino-nncf-baseline",
    kind="openvino-ir",
    help="OpenVINO's own int8 path (nncf.quantize, ModelType.TRANSFORMER, 300 training rows) as a peer.",
    config=NncfBaselineConfig,
)
def openvino_nncf_baseline(
    ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path
) -> dict[str, Any]:
    cfg = ctx.config(NncfBaselineConfig)
    export, source = (inputs[k] for k in call.inputs)  # the ONNX export, and the model it was made from
    tokenizer = source.file("tokenizer.json")
    texts = ctx.train.sample(cfg.rows, seed=cfg.seed + 3).texts
    model = nncf_int8(export.file("model.onnx"), tokenizer, texts, cfg.max_length, out)
    drift = compare(model, tokenizer, export.file(REFERENCE), ctx.threads, runtime="openvino")
    log.info("openvino-nncf-baseline: %d rows, max |logit diff| vs PyTorch %.3f", len(texts), drift["max_abs_diff"])
    return {"calibration_rows": len(texts), "model_type": "TRANSFORMER", "drift_vs_pytorch": drift}
