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
from toolchain.core.context import RunContext
from toolchain.core.manifest import file_table, lineage, target, write_manifest
from toolchain.core.registry import register
from toolchain.models import copy_tokenizer, source_identity
from toolchain.runtime import MANIFEST_VERSION


@register(
    "bundle",
    kind="bundle",
    help="Package the chosen variant with its tokenizer, labels, manifest and (optionally) its ORT-format copy.",
    version=3,  # 2: model.ort and the operator configuration; 3: the strings-in model
)
def bundle(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    recipe = ctx.recipe
    shipped = call.config["shipped"]
    variant_key = next(k for k in call.inputs if k not in ("finetune", "bench") and not k.startswith("evaluate."))
    shutil.copy2(inputs[variant_key].file("model.onnx"), out / "model.onnx")
    tokenizer_files = copy_tokenizer(inputs["finetune"].path, out)
    (out / "labels.json").write_text(json.dumps(recipe.data.labels))
    mobile = ort_format(out / "model.onnx") if call.config.get("ort_format") else None
    metrics = json.loads(inputs[f"evaluate.{shipped}"].file("metrics.json").read_text())
    strings = None
    if call.config.get("tokenizer") == "in-graph":
        strings = build_strings_model(ctx, call, out, np.load(inputs[f"evaluate.{shipped}"].file("logits.npy")))
    bench = json.loads(inputs["bench"].file("bench.json").read_text())
    latency = {
        case: {k: r[k] for k in ("p50", "p90", "p99")} for case, r in bench["variants"][shipped]["cases"].items()
    }
    files = file_table(out)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "name": recipe.name,
        "variant": shipped,
        "model": "model.onnx",
        "labels": recipe.data.labels,
        "preprocessing": {
            "tokenizer": "tokenizer.json",
            "tokenizer_files": tokenizer_files,
            "max_length": call.config["max_length"],
            "batch_size": call.config["batch_size"],
            "truncation": "longest_first, at max_length tokens (special tokens included)",
            "padding": "right, to the longest text in the batch, attention_mask 0 on padding",
            "outputs": "logits; softmax gives the label probabilities in the order of labels",
        },
        **io_spec(out / "model.onnx"),
        "metrics": {
            "accuracy": metrics["accuracy"],
            "eval_rows": metrics["rows"],
            "eval_file": recipe.data.eval,
            "latency_ms": latency,
            "size_bytes": files["model.onnx"]["bytes"],
        },
        "target": target(bench["threads"], call.config["budget"]),
        "lineage": lineage(ctx, call, source_identity(recipe.model.source, recipe.model)),
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
