"""The architecture matrix: every supported encoder type (toolchain.models.supported_encoders), as a tiny random
model with its family's own tokenizer, through fine-tune -> export -> optimize -> dynamic int8 -> bundle, then the
bundle's Predictor in a fresh process without torch agreeing with the evaluation; each is fed exactly the inputs
its forward and graph take."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import node_app_compare, tiny_recipe_dict, write_recipe
from tiny_encoders import FAMILIES, build

from toolchain import engine, model_inputs
from toolchain.data import load_splits
from toolchain.models import supported_encoders
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe
from toolchain.stages.optimize import ORT_MODEL_TYPES

pytestmark = pytest.mark.slow
# the Node app (examples/node) on a model without segment ids and on a byte-level BPE tokenizer, row by row
NODE_CHECKED = ("distilbert", "roberta")
WITH_SEGMENT_IDS = ("albert", "bert", "electra")  # the types whose exported graph takes segment ids


def test_the_matrix_covers_every_supported_type() -> None:
    assert set(supported_encoders()) == set(FAMILIES)


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> list[str]:
    """Real SST-2 training text for the tokenizers to learn from."""
    recipe = load_recipe(write_recipe(tmp_path_factory.mktemp("texts"), tiny_recipe_dict(tiny_model)))
    return load_splits(recipe)[0].texts


def lean_recipe(model: Path, name: str) -> dict:
    """The tiny recipe, pared to what the matrix checks: no peers, one bench case, one round."""
    data = tiny_recipe_dict(model, name)
    data["data"] |= {"max_train_rows": 256, "max_eval_rows": 48}
    data["finetune"] |= {"epochs": 1}
    del data["data"]["labels"]  # read from the data: SST-2's 0/1 become '0', '1'
    data["compile"]["export"]["parity_rows"] = 16
    data["bench"] = {
        "batch_sizes": [1],
        "seq_lens": ["real"],
        "warmup": 1,
        "min_iters": 3,
        "min_seconds": 0.0,
        "threads": 1,
        "rounds": 1,
        "optimum_baseline": False,
        "openvino_peers": False,
    }
    data["budget"] = {"max_accuracy_drop": 1.0, "latency_case": "b1_real"}
    data["bundle"] = {"ort_format": False}
    return data


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_type_runs_end_to_end_and_its_bundle_predicts_without_torch(
    model_type: str, texts: list[str], tmp_path: Path
) -> None:
    import onnx
    from transformers import AutoModelForSequenceClassification

    model = build(model_type, tmp_path / "model", texts[:2000])
    name = f"arch-{model_type}"
    ctx = engine.run(load_recipe(write_recipe(tmp_path, lean_recipe(model, name))), tmp_path / "runs")
    takes = model_inputs.forward_inputs(AutoModelForSequenceClassification.from_pretrained(model))
    report = json.loads((tmp_path / "runs" / name / "report.json").read_text())
    # a type onnxruntime's optimizer does not know gets no optimized variant (it would be the export again)
    fused = model_type in ORT_MODEL_TYPES
    assert [v["name"] for v in report["variants"]] == [
        "pytorch-fp32",
        "onnx-fp32",
        *(["onnx-fp32-optimized"] if fused else []),
        "onnx-int8-dynamic",
    ]
    by = {v["name"]: v for v in report["variants"]}
    # the export computes the same function (its parity check held, or the run would have failed); a barely trained
    # tiny model may have a near-tie that float rounding tips, so one row of slack
    assert abs(by["onnx-fp32"]["correct"] - by["pytorch-fp32"]["correct"]) <= 1
    says = "onnx-fp32-optimized" if fused else "onnx-fp32"
    fusions = by[says]["compression"]["fusions"]
    if fused:
        assert fusions.startswith("onnxruntime transformer optimizer"), fusions
        assert "fusions" not in by["onnx-fp32"]["compression"]
    else:
        assert fusions.startswith("none: onnxruntime's transformer optimizer does not know"), fusions
        assert "optimize" not in {s["key"] for s in report["stages"]}
    assert f"- {says}: {fusions}" in (tmp_path / "runs" / name / "report.md").read_text()

    bundle = tmp_path / "runs" / name / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = onnx.load(str(bundle / manifest["model"]), load_external_data=False).graph
    # the bundle names what the graph takes: what the forward takes, less what the exporter drops as unused
    # (segment ids of roberta-like models with one segment type); docs/models.md has the same table
    assert [i["name"] for i in manifest["inputs"]] == [i.name for i in graph.input]
    segment_ids = ["token_type_ids"] if model_type in WITH_SEGMENT_IDS else []
    assert [i.name for i in graph.input] == [*model_inputs.REQUIRED, *segment_ids]
    assert set(segment_ids) <= set(takes)
    assert all(i["from"] == model_inputs.ENCODING_FIELD[i["name"]] for i in manifest["inputs"])

    # the labels read from the training file reach every place an app or a reader looks
    assert report["data"]["labels"] == manifest["labels"] == json.loads((bundle / "labels.json").read_text())
    assert report["data"]["labels"] == ["0", "1"]
    assert report["data"]["labels_from"] == "read from sst2/train.tsv, class indices 0..N-1"
    report_md = (tmp_path / "runs" / name / "report.md").read_text()
    assert "Labels (output order): 0, 1 (read from sst2/train.tsv" in report_md
    shipped = report["shipped"]
    predictions = json.loads(ctx.artifacts[f"evaluate.{shipped}"].file("metrics.json").read_text())["predictions"]
    script = textwrap.dedent(f"""
        import json, sys
        from toolchain.runtime import Predictor
        preds = Predictor.load({str(bundle)!r}, threads=1).predict(json.loads(sys.stdin.read()))
        heavy = sorted(m for m in ("torch", "transformers", "optimum") if m in sys.modules)
        print(json.dumps({{"labels": [p.label for p in preds], "heavy": heavy}}))
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(ctx.eval.texts), capture_output=True, text=True, check=True
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["labels"] == [manifest["labels"][i] for i in predictions]
    if model_type in NODE_CHECKED:
        agreed = node_app_compare()(bundle, ctx.eval.texts)
        assert agreed["differ_rows"] == [] and agreed["agree"] == len(ctx.eval.texts)
        assert agreed["max_abs_logit_diff"] < 1e-4


def test_the_optional_input_is_named_only_in_the_model_inputs_helper() -> None:
    """What a model takes is read from the model: no other module of the toolchain names the segment-ids input."""
    named = sorted(
        str(p.relative_to(PROJECT_ROOT))
        for p in (PROJECT_ROOT / "toolchain").rglob("*.py")
        if re.search(r"token_type_ids", p.read_text())
    )
    assert named == ["toolchain/model_inputs.py"]


def test_a_model_folder_without_tokenizer_json_gets_one_converted(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "tokenizer.json").unlink()
    assert (folder / "vocab.txt").is_file()  # what transformers converts from
    engine.run(load_recipe(write_recipe(tmp_path, lean_recipe(folder, "no-tokenizer-json"))), tmp_path / "runs")
    bundle = tmp_path / "runs" / "no-tokenizer-json" / "bundle"
    assert (bundle / "tokenizer.json").is_file()
    from toolchain.runtime import Predictor

    assert Predictor.load(bundle).predict(["a gorgeous, witty film"])[0].label in ("0", "1")  # read from the data
