"""The `bundle` stage. Package the chosen variant with its tokenizer, labels, manifest and (optionally) its ORT-format
copy.

Helpers: `toolchain.bundle_files`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.bundle_files import app_forms, build_strings_model, io_spec, ort_format
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.manifest import file_table, lineage, target, write_manifest
from toolchain.core.registry import StageConfig, register
from toolchain.models import copy_tokenizer
from toolchain.runtime import MANIFEST_VERSION


class BundleConfig(StageConfig):
    shipped: str  # the chosen variant
    name: str  # the recipe's
    labels: list[str]
    eval_file: str
    max_length: int
    batch_size: int
    ort_format: bool
    tokenizer: str  # beside | in-graph
    budget: dict[str, Any]
    base_model: dict[str, str]  # the source model's identity (hashed)


@register(
    "bundle",
    kind="bundle",
    help="Package the chosen variant with its tokenizer, labels, manifest and (optionally) its ORT-format copy.",
    version=3,  # 2: model.ort and the operator configuration; 3: the strings-in model
    config=BundleConfig,
)
def bundle(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(BundleConfig)
    shipped = cfg.shipped
    variant_key = next(k for k in call.inputs if k not in ("finetune", "bench") and not k.startswith("evaluate."))
    shutil.copy2(inputs[variant_key].file("model.onnx"), out / "model.onnx")
    tokenizer_files = copy_tokenizer(inputs["finetune"].path, out)
    (out / "labels.json").write_text(json.dumps(cfg.labels))
    mobile = ort_format(out / "model.onnx") if cfg.ort_format else None
    metrics = json.loads(inputs[f"evaluate.{shipped}"].file("metrics.json").read_text())
    strings = None
    if cfg.tokenizer == "in-graph":
        logits = np.load(inputs[f"evaluate.{shipped}"].file("logits.npy"))
        strings = build_strings_model(ctx, out, cfg.labels, cfg.max_length, cfg.batch_size, logits)
    bench = json.loads(inputs["bench"].file("bench.json").read_text())
    latency = {
        case: {k: r[k] for k in ("p50", "p90", "p99")} for case, r in bench["variants"][shipped]["cases"].items()
    }
    files = file_table(out)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "name": cfg.name,
        "variant": shipped,
        "model": "model.onnx",
        "labels": cfg.labels,
        "preprocessing": {
            "tokenizer": "tokenizer.json",
            "tokenizer_files": tokenizer_files,
            "max_length": cfg.max_length,
            "batch_size": cfg.batch_size,
            "truncation": "longest_first, at max_length tokens (special tokens included)",
            "padding": "right, to the longest text in the batch, attention_mask 0 on padding",
            "outputs": "logits; softmax gives the label probabilities in the order of labels",
        },
        **io_spec(out / "model.onnx"),
        "metrics": {
            "accuracy": metrics["accuracy"],
            "eval_rows": metrics["rows"],
            "eval_file": cfg.eval_file,
            "latency_ms": latency,
            "size_bytes": files["model.onnx"]["bytes"],
        },
        "target": target(bench["threads"], cfg.budget),
        "lineage": lineage(ctx, call, cfg.base_model),
        "files": files,
        "bundle_bytes": sum(f["bytes"] for f in files.values()),
        "forms": app_forms(files, tokenizer_files, mobile is not None, strings is not None),
    }
    if mobile is not None:
        manifest["mobile"] = mobile
    if strings is not None:
        manifest["strings_model"] = {**strings, **io_spec(out / strings["file"])}
    write_manifest(out, manifest)
    return {"shipped": shipped, "files": sorted(files), "bundle_bytes": manifest["bundle_bytes"]}
