"""The OpenVINO target on the tiny model: an nncf-int8 variant measured through OpenVINO, shipped when the recipe's
budget.target is openvino, as a bundle an app runs with openvino alone (no onnxruntime, no torch), predicting what
the report measured."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_recipe

from toolchain import engine, model_inputs
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe
from toolchain.runtime import CPU_SESSION_CONFIG


@pytest.fixture(scope="module")
def openvino_run(first_run, tmp_path_factory: pytest.TempPathFactory):
    """The tiny recipe again (its training and export reused), with an nncf-int8 variant and budget.target openvino."""
    recipe_path, runs, _ = first_run
    folder = tmp_path_factory.mktemp("openvino")
    shutil.copytree(runs, folder / "runs")
    data = yaml.safe_load(recipe_path.read_text())
    data["compile"]["quantize"] = ["dynamic-int8", "nncf-int8"]
    data["budget"]["target"] = "openvino"
    data.pop("bundle")  # the strings-in model is onnxruntime's
    ctx = engine.run(load_recipe(write_recipe(folder, data)), folder / "runs")
    return ctx, folder / "runs" / "tiny"


def test_the_openvino_target_ships_the_openvino_variant(openvino_run) -> None:
    ctx, run = openvino_run
    assert {r.key: r.status for r in ctx.records}["finetune"] == "reused"
    report = json.loads((run / "report.json").read_text())
    by = {v["name"]: v for v in report["variants"]}
    assert report["shipped"] == "openvino-int8-nncf"
    assert by["openvino-int8-nncf"]["format"] == "openvino" and not by["openvino-int8-nncf"]["peer"]
    assert report["verdicts"]["onnx-int8-dynamic"] == "runs on onnxruntime, not on budget.target openvino"
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["runtime"] == {"name": "openvino", "precision": None}
    assert manifest["model"] == "model.xml" and {"model.xml", "model.bin"} <= set(manifest["files"])
    assert manifest["target"]["runtime"] == "openvino"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert "model.onnx" not in manifest["files"] and "mobile" not in manifest
    assert manifest["app"]["runtime"] == "openvino" and manifest["app"]["cold_start_seconds"] > 0
    # bundle.shape_buckets' default under max_length 128: what evaluation and bench ran, named for the app
    assert manifest["preprocessing"]["shape_buckets"] == [32, 64, 128]


def test_shape_buckets_run_static_shapes_with_the_logits_of_the_dynamic_model(openvino_run) -> None:
    from toolchain.compile.parity import graph_file
    from toolchain.runtime import OpenVinoClassifier

    ctx, _ = openvino_run
    graph = graph_file(ctx.artifacts["quantize.openvino-int8-nncf"].path)
    tokenizer = ctx.artifacts["finetune"].file("tokenizer.json")
    texts = ctx.eval.texts[:40]
    dynamic = OpenVinoClassifier(graph, tokenizer, 128, 1, fields=model_inputs.ENCODING_FIELD)
    bucketed = OpenVinoClassifier(graph, tokenizer, 128, 1, fields=model_inputs.ENCODING_FIELD, buckets=[16, 128])
    assert bucketed.encoder.encode(texts[:4])["input_ids"].shape[1] in (16, 128)
    # padding is masked: only kernel rounding differs (0.0025 at most here)
    np.testing.assert_allclose(bucketed.logits(texts, 4), dynamic.logits(texts, 4), atol=1e-2)
    assert bucketed.static_shapes and {length for _, length in bucketed.static_shapes} <= {16, 128}
    assert dynamic.static_shapes == []  # one model of dynamic shape, each batch at its own length


def test_an_openvino_bundle_runs_with_openvino_alone_and_predicts_what_was_measured(openvino_run) -> None:
    ctx, run = openvino_run
    measured = json.loads(ctx.artifacts["evaluate.openvino-int8-nncf"].file("metrics.json").read_text())
    app = textwrap.dedent(
        """
        import json, sys
        sys.modules["onnxruntime"] = None  # an OpenVINO app installs no onnxruntime: importing it fails
        sys.modules["torch"] = None
        from toolchain.runtime import Predictor
        predictor = Predictor.load(sys.argv[1], threads=1)
        texts = json.loads(sys.stdin.read())
        print(json.dumps([predictor.labels.index(p.label) for p in predictor.predict(texts)]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", app, str(run / "bundle")],
        input=json.dumps(ctx.eval.texts),
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=True,
    )
    assert json.loads(out.stdout) == measured["predictions"]


@pytest.mark.parametrize("bad", ["64", [32, "64"], [0, 64], [True]])
def test_a_hand_edited_shape_buckets_field_is_a_bundle_error(openvino_run, tmp_path: Path, bad) -> None:
    from toolchain.runtime import BundleError, Predictor

    _, run = openvino_run
    bundle = shutil.copytree(run / "bundle", tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["preprocessing"]["shape_buckets"] = bad
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: preprocessing\.shape_buckets must be a list"):
        Predictor.load(bundle, threads=1)


def test_a_classifier_onnxruntime_bundle_names_its_runtime(first_run) -> None:
    _, runs, _ = first_run
    manifest = json.loads((runs / "tiny" / "bundle" / "manifest.json").read_text())
    assert manifest["runtime"] == {"name": "onnxruntime", "cpu_session_config": CPU_SESSION_CONFIG}
    assert manifest["target"]["runtime"] == "onnxruntime"
    # what an app pays to start it, measured through Predictor in fresh processes, in the manifest and the report
    app = manifest["app"]
    assert app["processes"] == 3 and app["cold_start_seconds"] > 0 and app["peak_rss_bytes"] > 20e6
    report = json.loads((runs / "tiny" / "report.json").read_text())
    assert report["bundle_contents"]["app_start"] == app
    assert "App start through `Predictor` (onnxruntime" in (runs / "tiny" / "report.md").read_text()


def test_an_openvino_target_without_an_openvino_variant_is_refused(first_run, tmp_path: Path) -> None:
    from toolchain.errors import ToolchainError

    recipe_path, _, _ = first_run
    data = yaml.safe_load(recipe_path.read_text())
    data["budget"]["target"] = "openvino"
    data.pop("bundle")
    with pytest.raises(ToolchainError, match=r"add one to compile\.quantize"):
        load_recipe(write_recipe(tmp_path, data))
