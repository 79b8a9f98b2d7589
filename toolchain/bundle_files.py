"""The bundle stage: what an app embeds. model.onnx, tokenizer files, labels.json and manifest.json (format version,
sha256 of every file, input/output spec, preprocessing, the metrics measured for this exact file, the target and the
lineage); with `bundle.ort_format`, model.ort and required_operators.config for mobile and reduced builds; with
`bundle.tokenizer: in-graph`, model.strings.onnx (raw text in, label and scores out).
`toolchain.runtime.Predictor` loads it with numpy, onnxruntime and tokenizers alone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import model_inputs
from toolchain.compile.ingraph import check_strings_model, strings_model
from toolchain.core.context import StageContext
from toolchain.errors import StageError
from toolchain.runtime import OnnxClassifier

ONNX_TYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 9: "bool", 8: "string"}


def io_spec(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs: name, element type and shape (a name for a dynamic dimension)."""
    if model_path.suffix == ".xml":  # an OpenVINO IR
        import openvino as ov

        model = ov.Core().read_model(str(model_path))

        def ports(values: Any) -> list[dict[str, Any]]:
            return [
                {
                    "name": v.get_any_name(),
                    "type": v.get_element_type().get_type_name(),
                    "shape": [d.get_length() if d.is_static else "?" for d in v.get_partial_shape()],
                }
                for v in values
            ]

        return {"inputs": ports(model.inputs), "outputs": ports(model.outputs)}
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


def app_forms(
    files: dict[str, Any], model: list[str], tokenizer: list[str], mobile: bool, strings: bool
) -> dict[str, Any]:
    """The files each kind of app embeds (plus manifest.json) and their bytes: an app ships one form, not the folder."""
    runtime = " (OpenVINO)" if model[0].endswith(".xml") else ""
    forms = {f"{' + '.join(model)} + tokenizer{runtime}": [*model, *tokenizer, "labels.json"]}
    if mobile:
        forms["model.ort + tokenizer (onnxruntime-mobile, reduced builds)"] = ["model.ort", *tokenizer, "labels.json"]
    if strings:
        forms["model.strings.onnx (onnxruntime + onnxruntime-extensions)"] = ["model.strings.onnx"]
    return {
        name: {"files": names, "bytes": sum(files[n]["bytes"] for n in names if n in files)}
        for name, names in forms.items()
    }


def build_strings_model(
    ctx: StageContext, out: Path, labels: list[str], max_length: int, batch_size: int, eval_logits: np.ndarray
) -> dict[str, Any]:
    """model.strings.onnx (`bundle.tokenizer: in-graph`), checked against model.onnx on every eval row: the same label
    on each, else the stage fails naming the rows. Returns its manifest entry."""

    model = strings_model(out / "model.onnx", out, max_length, labels)
    path = out / "model.strings.onnx"
    path.write_bytes(model.SerializeToString())
    texts = ctx.eval.texts
    if batch_size != 1:  # the strings graph runs one text at a time: compare at batch 1
        clf = OnnxClassifier(
            out / "model.onnx", out / "tokenizer.json", max_length, ctx.threads, fields=model_inputs.ENCODING_FIELD
        )
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
