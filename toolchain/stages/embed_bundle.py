"""The `embed-bundle` stage. Package the chosen embedder: model.onnx (token ids in, unit vectors out), the tokenizer
and manifest.json (kind `embedder`: dimension, pooling, inputs with their tokenizer fields, the metrics measured for
this exact file, lineage). `toolchain.runtime.Embedder` loads it with numpy, onnxruntime and tokenizers alone."""

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
from toolchain.embed.model import pooling_settings
from toolchain.errors import StageError
from toolchain.models import copy_tokenizer
from toolchain.runtime import CPU_SESSION_CONFIG, EMBEDDER_MANIFEST_VERSION, Embedder


class EmbedBundleConfig(StageConfig):
    shipped: str
    name: str
    eval_file: str
    test_file: str | None
    max_length: int
    batch_size: int
    ort_format: bool
    budget: dict[str, Any]
    base_model: dict[str, str]


@register(
    "embed-bundle",
    kind="bundle",
    help="Package the chosen embedder with its tokenizer and manifest; check the bundle embeds as measured.",
    config=EmbedBundleConfig,
)
def embed_bundle(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(EmbedBundleConfig)
    variant_key = next(k for k in call.inputs if k not in ("finetune", "bench") and not k.startswith("evaluate."))
    shutil.copy2(inputs[variant_key].file("model.onnx"), out / "model.onnx")
    tokenizer_files = copy_tokenizer(inputs["finetune"].path, out)
    mobile = ort_format(out / "model.onnx") if cfg.ort_format else None
    evaluated = inputs[f"evaluate.{cfg.shipped}"]
    metrics = json.loads(evaluated.file("metrics.json").read_text())
    bench = json.loads(inputs["bench"].file("bench.json").read_text())
    latency = {
        case: {k: r[k] for k in ("p50", "p90", "p99")} for case, r in bench["variants"][cfg.shipped]["cases"].items()
    }
    files = file_table(out)
    io = io_spec(out / "model.onnx")
    io["inputs"] = model_inputs.manifest_inputs(io["inputs"])
    pooling = pooling_settings(inputs["finetune"].path)
    measured = {
        split: {k: metrics[split][k] for k in ("pairs", "spearman", "pearson")}
        for split in ("eval", "test")
        if split in metrics
    }
    manifest = {
        "kind": "embedder",
        "format_version": EMBEDDER_MANIFEST_VERSION,
        "name": cfg.name,
        "variant": cfg.shipped,
        "model": "model.onnx",
        "runtime": {"name": "onnxruntime", "cpu_session_config": dict(CPU_SESSION_CONFIG)},
        "dimension": metrics["dimension"],
        "pooling": pooling["pooling"],
        "normalized": pooling["normalize"],
        "preprocessing": {
            "tokenizer": "tokenizer.json",
            "tokenizer_files": tokenizer_files,
            "max_length": cfg.max_length,
            "batch_size": cfg.batch_size,
            "truncation": "longest_first, at max_length tokens (special tokens included)",
            "padding": "right, to the longest text in the batch, attention_mask 0 on padding",
            "outputs": "embeddings: (batch, dimension) float32, mean-pooled over the attention mask"
            + (", L2-normalized: a dot product is the cosine similarity" if pooling["normalize"] else ""),
        },
        **io,
        "metrics": {
            "spearman_x100": measured,
            "eval_file": cfg.eval_file,
            "test_file": cfg.test_file,
            "fidelity": metrics.get("fidelity"),
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
    # the bundle as an app loads it gives the embeddings the evaluate stage measured (its eval texts, first 64)
    texts = ctx.eval.texts[:64]
    got = Embedder.load(out, threads=ctx.threads).embed(texts)
    want = np.load(evaluated.file("embeddings.npz"))["eval"][: len(texts)]
    worst = float((got * want).sum(-1).min()) if len(texts) else 1.0
    if worst < 0.999:
        raise StageError(
            "embed-bundle",
            f"the bundle's embeddings of the first eval texts differ from the measured ones (lowest cosine "
            f"{worst:.5f}); the bundle does not run the graph that was evaluated",
        )
    return {"shipped": cfg.shipped, "files": sorted(files), "min_cosine_to_measured": worst}
