"""The `pair-bundle` stage. Package the chosen cross-encoder: model.onnx (the pair's token ids in, logits or a score
out), the tokenizer and manifest.json (kind `cross-encoder`: objective, labels or score scale); checks that
`toolchain.runtime.CrossEncoder` gives on eval pairs what the evaluation measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import model_inputs
from toolchain.bundle_files import io_spec, ort_format
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.manifest import file_table, lineage, target, write_manifest
from toolchain.core.registry import StageConfig, register
from toolchain.data import text_items
from toolchain.errors import StageError
from toolchain.models import copy_tokenizer
from toolchain.runtime import CPU_SESSION_CONFIG, CROSS_ENCODER_MANIFEST_VERSION, CrossEncoder


class PairBundleConfig(StageConfig):
    shipped: str
    name: str
    objective: str
    labels: list[str]
    score_max: float
    eval_file: str
    test_file: str | None
    max_length: int
    batch_size: int
    ort_format: bool
    budget: dict[str, Any]
    base_model: dict[str, str]


@register(
    "pair-bundle",
    kind="bundle",
    help="Package the chosen cross-encoder with its tokenizer and manifest; check it predicts the measured outputs.",
    config=PairBundleConfig,
)
def pair_bundle(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(PairBundleConfig)
    variant_key = next(k for k in call.inputs if k not in ("finetune", "bench") and not k.startswith("evaluate."))
    shutil.copy2(inputs[variant_key].file("model.onnx"), out / "model.onnx")
    tokenizer_files = copy_tokenizer(inputs["finetune"].path, out)
    mobile = ort_format(out / "model.onnx") if cfg.ort_format else None
    metrics = json.loads(inputs[f"evaluate.{cfg.shipped}"].file("metrics.json").read_text())
    bench = json.loads(inputs["bench"].file("bench.json").read_text())
    latency = {
        case: {k: r[k] for k in ("p50", "p90", "p99")} for case, r in bench["variants"][cfg.shipped]["cases"].items()
    }
    files = file_table(out)
    io = io_spec(out / "model.onnx")
    io["inputs"] = model_inputs.manifest_inputs(io["inputs"])
    regression = cfg.objective == "regression"
    keys = ("pairs", "spearman", "pearson") if regression else ("pairs", "accuracy")
    measured = {split: {k: metrics[split][k] for k in keys} for split in ("eval", "test") if split in metrics}
    manifest = {
        "kind": "cross-encoder",
        "format_version": CROSS_ENCODER_MANIFEST_VERSION,
        "name": cfg.name,
        "variant": cfg.shipped,
        "model": "model.onnx",
        "runtime": {"name": "onnxruntime", "cpu_session_config": dict(CPU_SESSION_CONFIG)},
        "objective": cfg.objective,
        "labels": [] if regression else cfg.labels,
        "score_max": cfg.score_max,
        "preprocessing": {
            "tokenizer": "tokenizer.json",
            "tokenizer_files": tokenizer_files,
            "max_length": cfg.max_length,
            "batch_size": cfg.batch_size,
            "pairs": "text and text_pair encoded together ([CLS] text [SEP] text_pair [SEP], segment ids 0 then 1), "
            "the longer cut first past max_length",
            "outputs": "logits (batch, 1): the score / score_max"
            if regression
            else "logits (batch, labels); softmax gives the label probabilities in the order of labels",
        },
        **io,
        "metrics": {
            "measured": measured,
            "eval_file": cfg.eval_file,
            "test_file": cfg.test_file,
            "latency_ms": latency,
            "size_bytes": files["model.onnx"]["bytes"],
        },
        "target": target(bench["threads"], cfg.budget),
        "lineage": lineage(ctx, call, cfg.base_model),
        "files": files,
        "bundle_bytes": sum(f["bytes"] for f in files.values()),
    }
    if mobile is not None:
        manifest["mobile"] = mobile
    write_manifest(out, manifest)
    # the bundle as an app loads it: the first eval pairs give what the evaluation measured
    items = text_items(ctx.eval)[:64]
    encoder = CrossEncoder.load(out, threads=ctx.threads)
    if regression:
        got = encoder.score(items) / cfg.score_max
        worst = float(np.abs(got - np.asarray(metrics["eval"]["scores"][: len(items)])).max()) if items else 0.0
        ok = worst < 1e-3
    else:
        got_labels = [cfg.labels.index(p.label) for p in encoder.predict(items)]
        worst = float(sum(a != b for a, b in zip(got_labels, metrics["eval"]["predictions"], strict=False)))
        ok = worst == 0
    if not ok:
        raise StageError(
            "pair-bundle", f"the bundle's outputs on the first eval pairs differ from the measured ones ({worst})"
        )
    return {"shipped": cfg.shipped, "files": sorted(files), "check_on_eval_pairs": worst}
