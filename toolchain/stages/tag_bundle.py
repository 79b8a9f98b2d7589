"""The `tag-bundle` stage. Package the chosen token classifier: model.onnx (token ids in, per-token tag logits out),
the tokenizer, labels.json (the tags) and manifest.json (kind `tagger`); checks that `toolchain.runtime.Tagger` finds,
on eval sentences joined by spaces, the entities the evaluation measured on their words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from toolchain import model_inputs
from toolchain.bundle_files import io_spec, ort_format
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.manifest import file_table, lineage, target, write_manifest
from toolchain.core.registry import StageConfig, register
from toolchain.errors import StageError
from toolchain.models import copy_tokenizer
from toolchain.runtime import CPU_SESSION_CONFIG, TAGGER_MANIFEST_VERSION, Tagger, bio_entities


class TagBundleConfig(StageConfig):
    shipped: str
    name: str
    labels: list[str]
    eval_file: str
    test_file: str | None
    max_length: int
    batch_size: int
    ort_format: bool
    budget: dict[str, Any]
    base_model: dict[str, str]


@register(
    "tag-bundle",
    kind="bundle",
    help="Package the chosen token classifier with its tokenizer, tags and manifest; check Tagger finds the measured "
    "entities from raw text.",
    config=TagBundleConfig,
)
def tag_bundle(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(TagBundleConfig)
    variant_key = next(k for k in call.inputs if k not in ("finetune", "bench") and not k.startswith("evaluate."))
    shutil.copy2(inputs[variant_key].file("model.onnx"), out / "model.onnx")
    tokenizer_files = copy_tokenizer(inputs["finetune"].path, out)
    (out / "labels.json").write_text(json.dumps(cfg.labels))
    mobile = ort_format(out / "model.onnx") if cfg.ort_format else None
    metrics = json.loads(inputs[f"evaluate.{cfg.shipped}"].file("metrics.json").read_text())
    bench = json.loads(inputs["bench"].file("bench.json").read_text())
    latency = {
        case: {k: r[k] for k in ("p50", "p90", "p99")} for case, r in bench["variants"][cfg.shipped]["cases"].items()
    }
    files = file_table(out)
    io = io_spec(out / "model.onnx")
    io["inputs"] = model_inputs.manifest_inputs(io["inputs"])
    measured = {
        split: {k: metrics[split][k] for k in ("sentences", "f1", "precision", "recall", "entities")}
        for split in ("eval", "test")
        if split in metrics
    }
    manifest = {
        "kind": "tagger",
        "format_version": TAGGER_MANIFEST_VERSION,
        "name": cfg.name,
        "variant": cfg.shipped,
        "model": "model.onnx",
        "runtime": {"name": "onnxruntime", "cpu_session_config": dict(CPU_SESSION_CONFIG)},
        "labels": cfg.labels,
        "scheme": "BIO",
        "preprocessing": {
            "tokenizer": "tokenizer.json",
            "tokenizer_files": tokenizer_files,
            "max_length": cfg.max_length,
            "batch_size": 1,
            "words": "the text split at white space (runs of non-space characters), each word tokenized on its own "
            "(is_pretokenized); a word's tag is the one predicted at its first sub-token",
            "outputs": "logits (batch, tokens, tags); softmax over the last axis, in the order of labels",
            "entities": "BIO tags read as seqeval does: B- starts an entity, I- continues one of its type or starts "
            "one",
        },
        **io,
        "metrics": {
            "entity_f1_x100": measured,
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
    # raw text in (the eval sentences joined by spaces): the entities the evaluation found on the words
    words = ctx.eval.words
    assert words is not None
    rows = list(range(min(100, len(words))))
    found = Tagger.load(out, threads=ctx.threads).tag([" ".join(words[i]) for i in rows])
    agree = 0
    for i, spans in zip(rows, found, strict=True):
        want = {
            (k, " ".join(words[i][a : b + 1]))
            for k, a, b in bio_entities([cfg.labels[t] for t in metrics["eval"]["predicted"][i]])
        }
        agree += int({(e.type, e.text) for e in spans} == want)
    if agree < len(rows):
        raise StageError(
            "tag-bundle",
            f"Tagger found other entities than the evaluation on {len(rows) - agree} of {len(rows)} eval sentences; "
            "the bundle does not tag as measured",
        )
    return {"shipped": cfg.shipped, "files": sorted(files), "raw_text_agreement": f"{agree}/{len(rows)}"}
