"""The bundle stage: what an app embeds. model.onnx, tokenizer files, labels.json and manifest.json (format version,
sha256 of every file, input/output spec, preprocessing, the metrics measured for this exact file, the target and the
lineage); with `bundle.ort_format`, model.ort and required_operators.config for mobile and reduced builds; with
`bundle.tokenizer: in-graph`, model.strings.onnx (raw text in, label and scores out).
`toolchain.runtime.Predictor` loads it with numpy, onnxruntime and tokenizers alone."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import faults
from toolchain.errors import StageError
from toolchain.models import copy_tokenizer, source_identity
from toolchain.pipeline import Artifact, RunContext, StageCall, sha256_file
from toolchain.registry import register
from toolchain.runtime import MANIFEST_VERSION, BundleError

ONNX_TYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 9: "bool", 8: "string"}


def io_spec(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph

    def spec(values: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "type": ONNX_TYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": spec(graph.input), "outputs": spec(graph.output)}


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
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(out.iterdir())}
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
        "target": {
            "provider": "CPUExecutionProvider",
            "threads": bench["threads"],
            "machine": platform.machine(),
            "budget": call.config["budget"],
        },
        "lineage": {
            "recipe": call.identity["recipe"],
            "base_model": source_identity(recipe.model.source, recipe.model),
            "stages": [{"key": r.key, "stage": r.stage, "id": r.id, "config": r.config} for r in ctx.records],
            "versions": ctx.versions,
        },
        "files": files,
        "bundle_bytes": sum(f["bytes"] for f in files.values()),
        "forms": app_forms(files, tokenizer_files, mobile is not None, strings is not None),
    }
    if mobile is not None:
        manifest["mobile"] = mobile
    if strings is not None:
        manifest["strings_model"] = {**strings, **io_spec(out / strings["file"])}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"shipped": shipped, "files": sorted(files), "bundle_bytes": manifest["bundle_bytes"]}


def app_forms(files: dict[str, Any], tokenizer: list[str], mobile: bool, strings: bool) -> dict[str, Any]:
    """The files each kind of app embeds (plus manifest.json) and their bytes: an app ships one form, not the folder."""
    forms = {"model.onnx + tokenizer": ["model.onnx", *tokenizer, "labels.json"]}
    if mobile:
        forms["model.ort + tokenizer (onnxruntime-mobile, reduced builds)"] = ["model.ort", *tokenizer, "labels.json"]
    if strings:
        forms["model.strings.onnx (onnxruntime + onnxruntime-extensions)"] = ["model.strings.onnx"]
    return {
        name: {"files": names, "bytes": sum(files[n]["bytes"] for n in names if n in files)}
        for name, names in forms.items()
    }


def build_strings_model(ctx: RunContext, call: StageCall, out: Path, eval_logits: np.ndarray) -> dict[str, Any]:
    """model.strings.onnx (`bundle.tokenizer: in-graph`), checked against model.onnx on every eval row: the same label
    on each, else the stage fails naming the rows. Returns its manifest entry."""
    from toolchain.compile.ingraph import check_strings_model, strings_model
    from toolchain.runtime import OnnxClassifier

    labels = ctx.recipe.data.labels
    model = strings_model(out / "model.onnx", out, call.config["max_length"], labels)
    path = out / "model.strings.onnx"
    path.write_bytes(model.SerializeToString())
    texts = ctx.eval.texts
    if call.config["batch_size"] != 1:  # the strings graph runs one text at a time: compare at batch 1
        clf = OnnxClassifier(out / "model.onnx", out / "tokenizer.json", call.config["max_length"], ctx.threads)
        eval_logits = clf.logits(texts, 1)
    reference = eval_logits.argmax(-1)
    check = check_strings_model(path, texts, reference, labels)
    if check["agree"] != check["rows"]:
        raise StageError(
            "bundle",
            f"model.strings.onnx disagrees with model.onnx on {check['rows'] - check['agree']} of {check['rows']} "
            f"eval rows (first: {check['differ_rows']}); set bundle.tokenizer: beside and report this model",
        )
    correct = int((check["predictions"] == ctx.eval.labels).sum())
    return {
        "file": path.name,
        "needs": ["onnxruntime", "onnxruntime-extensions (custom op library: the BertTokenizer op)"],
        "batch": "one text per run: input text is string [1]",
        "outputs_meaning": "label: the label string; scores: softmax probabilities in the order of labels; logits",
        "accuracy": correct / check["rows"],
        "eval_rows": check["rows"],
        "agrees_with_model_onnx": f"{check['agree']}/{check['rows']} eval rows, batch 1",
    }


def ort_format(model: Path) -> dict[str, Any]:
    """The model in onnxruntime's ORT format (for onnxruntime-mobile and minimal builds) beside model.onnx, and the
    operator configuration a reduced build takes (`build.sh --minimal_build --include_ops_by_config ...`)."""
    import tempfile

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copy2(model, src)
        convert_onnx_models_to_ort(src, Path(tmp) / "ort", [OptimizationStyle.Fixed])
        shutil.move(Path(tmp) / "ort" / "model.ort", model.with_name("model.ort"))
        (config,) = (Path(tmp) / "ort").glob("*.config")
        shutil.move(config, model.with_name("required_operators.config"))
    return {
        "ort_model": "model.ort",
        "operator_config": "required_operators.config",
        "optimization_style": "Fixed (optimizations for this CPU's provider baked in)",
        "reduced_build": "onnxruntime/build.sh --minimal_build --include_ops_by_config required_operators.config",
    }


def publish_bundle(art: Artifact, dest: Path) -> Path:
    """Copy the bundle artifact to `dest` (runs/<recipe>/bundle) atomically, unless it is already there intact."""
    manifest = art.file("manifest.json")
    current = dest / "manifest.json"
    if current.is_file() and current.read_bytes() == manifest.read_bytes() and _intact(dest):
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(art.path, tmp, ignore=shutil.ignore_patterns("artifact.json"))
        faults.point("publish", "publish", "mid-stage")
        if dest.exists():
            os.replace(dest, old)
        # A kill between these two renames leaves no `dest` and the previous bundle as `.bundle.old-*`:
        # recover_bundle puts it back at the next run, before anything else.
        faults.point("publish", "publish", "before-rename")
        os.replace(tmp, dest)
    except BaseException:  # an exception or Ctrl-C: the previous bundle stays where it was
        if not dest.exists() and old.exists():
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest


def recover_bundle(dest: Path) -> list[str]:
    """Undo what an interrupted publish_bundle left (called with the run lock held): a previous bundle moved aside
    goes back into place when `dest` is missing, and the half-copied and moved-aside folders are removed."""
    notes = []
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"))
    if not dest.exists() and olds:
        os.replace(olds[-1], dest)
        notes.append(f"{olds[-1].name} put back as {dest.name}")
        olds = olds[:-1]
    for p in [*olds, *dest.parent.glob(f".{dest.name}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"{p.name} removed")
    return notes


def _intact(folder: Path) -> bool:
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        p = folder / name
        if not p.is_file() or sha256_file(p) != info["sha256"]:
            return False
    return True


def verify_bundle(folder: Path) -> None:
    """Raise BundleError if a bundle folder is missing files or any file changed."""
    if not (folder / "manifest.json").is_file():
        raise BundleError(f"{folder}: no manifest.json")
    if not _intact(folder):
        raise BundleError(f"{folder}: files do not match manifest.json")
