"""The Optimum baseline: the variant an Optimum user would make from the same weights, measured beside ours.

optimum's ORT export, ORTOptimizer at its O2 preset (the fusions optimum recommends for CPU), then ORTQuantizer
dynamic int8 with optimum's preset for this CPU's instruction set (avx512_vnni, avx512, avx2 or arm64), per-tensor
as those presets default to. Nothing is tuned: it is the reference the report's ratios are taken against.

With onnxruntime 1.32 ORTQuantizer fails on O2's output for BERT ("Unable to find data type for weight_name ...":
the fused Attention's outputs have no inferred type, and optimum passes no DefaultTensorType, huggingface/optimum#1959),
so the stage falls back to O1, as a user would, and records why."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from toolchain.compile.parity import REFERENCE, compare
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.errors import StageError

log = logging.getLogger("toolchain")


class OptimumBaselineConfig(StageConfig):
    preset: str  # AutoQuantizationConfig's preset for this CPU: avx512_vnni, avx512, avx2 or arm64


@register(
    "optimum-baseline",
    kind="onnx-quantized",
    help="Optimum's own path (export, ORTOptimizer O2, ORTQuantizer dynamic int8 for this CPU) as a baseline.",
    config=OptimumBaselineConfig,
)
def optimum_baseline(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    model_dir, export = (inputs[k] for k in call.inputs)  # the model, and its export (the PyTorch reference logits)
    src = model_dir.path
    preset = ctx.config(OptimumBaselineConfig).preset
    work = out / "work"
    model = ORTModelForSequenceClassification.from_pretrained(src, export=True)
    qconfig = getattr(AutoQuantizationConfig, preset)(is_static=False)
    failures = {}
    for level in ("O2", "O1"):
        try:
            optimizer = ORTOptimizer.from_pretrained(model)
            optimizer.optimize(
                save_dir=work / level, optimization_config=AutoOptimizationConfig.with_optimization_level(level)
            )
            quantizer = ORTQuantizer.from_pretrained(work / level, file_name="model_optimized.onnx")
            quantizer.quantize(save_dir=work / f"{level}-quantized", quantization_config=qconfig)
            break
        except RuntimeError as e:
            # ORTQuantizer cannot type the outputs of O2's fused contrib ops and offers no way to pass onnxruntime's
            # DefaultTensorType (huggingface/optimum#1959); an Optimum user then falls back to a lower level.
            failures[level] = str(e).splitlines()[0][:300]
            log.warning(
                "optimum-baseline: %s, then ORTQuantizer failed (%s...); next level", level, failures[level][:80]
            )
    else:
        raise StageError("optimum-baseline", f"Optimum's path failed at every level: {failures}")
    (quantized,) = (work / f"{level}-quantized").glob("*quantized.onnx")
    shutil.move(quantized, out / "model.onnx")
    shutil.rmtree(work)
    drift = compare(
        out / "model.onnx",
        src / "tokenizer.json",
        export.file(REFERENCE),
        ctx.threads,
    )
    log.info("optimum-baseline: preset %s, max |logit diff| vs PyTorch %.3f", preset, drift["max_abs_diff"])
    return {
        "preset": preset,
        "optimization": level,
        "failed_levels": failures,
        "per_channel": qconfig.per_channel,
        "operators_to_quantize": list(qconfig.operators_to_quantize),
        "drift_vs_pytorch": drift,
    }
