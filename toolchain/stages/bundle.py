"""The `bundle` stage. Package the chosen variant with its tokenizer, labels, manifest and (optionally) its ORT-format
copy.

Helpers: `toolchain.bundle_files`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from toolchain import model_inputs
from toolchain.bundle_files import app_forms, build_strings_model, io_spec, ort_format
from toolchain.choose import RUNTIME_OF_FORMAT
from toolchain.compile.parity import graph_file
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.launcher import measure_once
from toolchain.core.manifest import file_table, lineage, target, write_manifest
from toolchain.core.registry import StageConfig, register
from toolchain.models import copy_tokenizer
from toolchain.runtime import CPU_SESSION_CONFIG, MANIFEST_VERSION, openvino_hint


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
    format: str  # the shipped variant's: onnx (onnxruntime) | openvino
    precision: str
    eval_text: str  # the first eval row: the one text the app start is measured with
    # openvino: the sequence lengths inputs are padded to (bundle.shape_buckets)
    shape_buckets: list[int] = Field(default_factory=list)


@register(
    "bundle",
    kind="bundle",
    help="Package the chosen variant with its tokenizer, labels, manifest and (optionally) its ORT-format copy.",
    version=4,  # 2: model.ort and its op configuration; 3: the strings-in model; 4: the manifest names the runtime
    config=BundleConfig,
)
def bundle(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(BundleConfig)
    shipped = cfg.shipped
    variant_key = next(k for k in call.inputs if k not in ("finetune", "bench") and not k.startswith("evaluate."))
    graph = graph_file(inputs[variant_key].path)
    model_files = [graph.name] + (["model.bin"] if graph.suffix == ".xml" else [])
    for name in model_files:
        shutil.copy2(graph.parent / name, out / name)
    runtime: dict[str, Any] = {"name": RUNTIME_OF_FORMAT[cfg.format]}
    if cfg.format == "openvino":
        runtime["precision"] = openvino_hint(cfg.precision)  # None: OpenVINO's default for the CPU
    else:  # what the measured sessions set on the CPU provider; an app sets them too (SessionOptions config entries)
        runtime["cpu_session_config"] = dict(CPU_SESSION_CONFIG)
    tokenizer_files = copy_tokenizer(inputs["finetune"].path, out)
    (out / "labels.json").write_text(json.dumps(cfg.labels))
    onnxruntime = runtime["name"] == "onnxruntime"  # ORT format and the strings-in model are onnxruntime's
    mobile = ort_format(out / "model.onnx") if cfg.ort_format and onnxruntime else None
    metrics = json.loads(inputs[f"evaluate.{shipped}"].file("metrics.json").read_text())
    strings = None
    if cfg.tokenizer == "in-graph" and onnxruntime:
        logits = np.load(inputs[f"evaluate.{shipped}"].file("logits.npy"))
        strings = build_strings_model(ctx, out, cfg.labels, cfg.max_length, cfg.batch_size, logits)
    bench = json.loads(inputs["bench"].file("bench.json").read_text())
    latency = {
        case: {k: r[k] for k in ("p50", "p90", "p99")} for case, r in bench["variants"][shipped]["cases"].items()
    }
    files = file_table(out)
    io = io_spec(out / graph.name)
    io["inputs"] = model_inputs.manifest_inputs(io["inputs"])  # each with the tokenizer field it comes from
    manifest = {
        "format_version": MANIFEST_VERSION,
        "name": cfg.name,
        "variant": shipped,
        "model": graph.name,
        "runtime": runtime,
        "labels": cfg.labels,
        "preprocessing": {
            "tokenizer": "tokenizer.json",
            "tokenizer_files": tokenizer_files,
            "max_length": cfg.max_length,
            "batch_size": cfg.batch_size,
            "truncation": "longest_first, at max_length tokens (special tokens included)",
            "padding": "right, to the longest text in the batch, attention_mask 0 on padding"
            if not cfg.shape_buckets
            else "right, to the smallest of shape_buckets that holds the batch's longest text, attention_mask 0 on "
            "padding; each of those lengths runs as a model compiled for that static shape",
            **({"shape_buckets": cfg.shape_buckets} if cfg.shape_buckets else {}),
            "outputs": "logits; softmax gives the label probabilities in the order of labels",
        },
        **io,
        "metrics": {
            "accuracy": metrics["accuracy"],
            "eval_rows": metrics["rows"],
            "eval_file": cfg.eval_file,
            "latency_ms": latency,
            "size_bytes": sum(files[name]["bytes"] for name in model_files),
        },
        "target": target(bench["threads"], cfg.budget, runtime["name"]),
        "lineage": lineage(ctx, call, cfg.base_model),
        "files": files,
        "bundle_bytes": sum(f["bytes"] for f in files.values()),
        "forms": app_forms(files, model_files, tokenizer_files, mobile is not None, strings is not None),
    }
    if mobile is not None:
        manifest["mobile"] = mobile
    if strings is not None:
        manifest["strings_model"] = {**strings, **io_spec(out / strings["file"])}
    write_manifest(out, manifest)
    # what an app pays to start it: Predictor.load + one prediction in a fresh process, as an app would
    manifest["app"] = app_start(out, bench["threads"], cfg.eval_text, runtime["name"])
    write_manifest(out, manifest)
    return {"shipped": shipped, "files": sorted(files), "bundle_bytes": manifest["bundle_bytes"]}


APP_STARTS = 3  # fresh processes; the median cold start and the largest peak memory are reported


def app_start(bundle: Path, threads: int, text: str, runtime: str) -> dict[str, Any]:
    """Cold start (process start to first prediction, through Predictor.load) and peak RSS of the bundle in an app
    process, over APP_STARTS processes."""
    job = bundle.parent / f".app-job-{bundle.name}.json"
    job.write_text(json.dumps({"bundle": str(bundle), "threads": threads, "text": text}))
    starts, rss = [], []
    try:
        for i in range(APP_STARTS):
            proc_started = time.time()
            answer = measure_once("bundle", f"app start {i + 1}", "toolchain.evaluate.app_measure", job, threads)
            starts.append(answer["first_result_at"] - proc_started)
            rss.append(answer["peak_rss_bytes"])
    finally:
        job.unlink(missing_ok=True)
        job.with_suffix(".log").unlink(missing_ok=True)
    return {
        "runtime": runtime,
        "processes": APP_STARTS,
        "cold_start_seconds": round(float(np.median(starts)), 3),
        "peak_rss_bytes": max(rss),
        "goals": {"cold_start_seconds": 0.3, "peak_rss_bytes": 150_000_000},  # reported, not gated
    }
