"""The optimize stage: onnxruntime's transformer optimizer (attention, embedding LayerNorm, GELU fusions; the
residual Add + LayerNorm left unfused, being faster on the CPU).

The fused graph stays portable: only the optimizer's fusions and ORT's basic graph rewrites (opt level 1) are saved,
not the machine-specific layouts of higher levels."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from toolchain.compile.export import check_parity
from toolchain.compile.parity import REFERENCE, export_key
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.errors import StageError
from toolchain.models import resolve_source
from toolchain.recipe.schema import Recipe

log = logging.getLogger("toolchain")

# Model families the ORT transformer optimizer knows, by transformers' model_type.
ORT_MODEL_TYPES = {
    "bert": "bert",
    "distilbert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "deberta-v2": "bert",
    "electra": "bert",
}


def no_fusions(model_type: str | None) -> str | None:
    """Why onnxruntime's transformer optimizer has nothing for `model_type` (None: it fuses that family)."""
    if model_type in ORT_MODEL_TYPES:
        return None
    return (
        f"none: onnxruntime's transformer optimizer does not know model_type {model_type!r} (the exported graph is "
        "quantized and shipped as it is; compile.optimize adds no variant)"
    )


def no_fusions_for(recipe: Recipe) -> str | None:
    """Why compile.optimize has nothing to do for the recipe's model (None: optimize is off, or onnxruntime's
    optimizer fuses the model's family). The plan then leaves the optimize stage and its variant out."""
    if not recipe.compile.optimize:
        return None
    config = json.loads((resolve_source(recipe.model.source, recipe.model) / "config.json").read_text())
    return no_fusions(config.get("model_type"))


class OptimizeConfig(StageConfig):
    atol: float  # largest allowed |fused - PyTorch| logit difference (the export's tolerance)


@register(
    "optimize",
    kind="onnx",
    help="Fuse attention/LayerNorm/GELU with onnxruntime's transformer optimizer.",
    version=2,  # 2: the residual Add + LayerNormalization left unfused (onnxruntime's CPU SkipLayerNorm is slow)
    config=OptimizeConfig,
)
def optimize(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    export = export_key(call.inputs)
    exported = inputs[export]
    # the model the export was made from: its config names the fusions' model type, heads and hidden size
    hf_dir = inputs[next(k for k in call.inputs if k != export)].path
    config = json.loads((hf_dir / "config.json").read_text())
    unfused = no_fusions(config["model_type"])
    if unfused:  # the plan leaves this stage out for such a model
        raise StageError("optimize", unfused)
    model_type = ORT_MODEL_TYPES[config["model_type"]]
    options = FusionOptions(model_type)
    # residual Add + LayerNormalization stay two nodes: onnxruntime's CPU SkipLayerNormalization kernel is a scalar
    # loop, 5-7x slower than the two (see toolchain.runtime.CPU_SESSION_CONFIG, which keeps sessions from re-fusing)
    options.enable_skip_layer_norm = False
    model = optimize_model(
        str(exported.file("model.onnx")),
        model_type=model_type,
        num_heads=config.get("num_attention_heads", 0),
        hidden_size=config.get("hidden_size", 0),
        opt_level=1,
        optimization_options=options,
    )
    model.save_model_to_file(str(out / "model.onnx"))
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    meta = check_parity(
        out / "model.onnx",
        hf_dir / "tokenizer.json",
        exported.file(REFERENCE),
        ctx.config(OptimizeConfig).atol,
        ctx.threads,
        "optimize",
    )
    fusions = ", ".join(f"{op} {n}" for op, n in sorted(fused.items())) or "none found"
    return {**meta, "fused_operators": fused, "fusions": f"onnxruntime transformer optimizer ({model_type}): {fusions}"}
