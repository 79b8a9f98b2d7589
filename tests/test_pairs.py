"""Sentence pairs: a tiny cross-encoder run end to end as a regressor of STS-B scores and as a pair classifier, whose
bundles give in a process without torch what the evaluation measured; pairs reach the tokenizer as pairs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_pair_recipe, write_recipe
from toolchain.errors import RecipeError
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe


def _run(folder: Path, recipe: dict):
    from toolchain import engine

    ctx = engine.run(load_recipe(write_recipe(folder, recipe)), folder / "runs")
    return ctx, folder / "runs" / recipe["name"]


def _app(bundle: Path, code: str, items: list) -> object:
    app = (
        textwrap.dedent(
            """
        import json, sys
        sys.modules["torch"] = None  # an app installs no torch: importing it fails
        sys.modules["transformers"] = None
        from toolchain.runtime import CrossEncoder
        encoder = CrossEncoder.load(sys.argv[1], threads=1)
        pairs = [tuple(p) for p in json.loads(sys.stdin.read())]
        """
        )
        + code
    )
    out = subprocess.run(
        [sys.executable, "-c", app, str(bundle)],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, data_root: Path):
    return _run(tmp_path_factory.mktemp("cross"), tiny_pair_recipe(tiny_model))


def test_a_cross_encoder_regressor_runs_end_to_end(regression_run) -> None:
    from toolchain.report.rows import pair_rows

    ctx, run = regression_run
    report = json.loads((run / "report.json").read_text())
    assert report["kind"] == "pairs" and report["objective"] == "regression" and report["metric"] == "spearman"
    assert len(pair_rows().validate_python(report["variants"])) == 4
    by = {r["name"]: r for r in report["variants"]}
    assert set(by["onnx-fp32"]["by_split"]) == {"eval", "test"}
    assert by["onnx-fp32"]["by_split"]["test"]["spearman"] == pytest.approx(
        by["pytorch-fp32"]["by_split"]["test"]["spearman"], abs=0.05
    )
    assert set(by["pytorch-fp32"]["latency_ms"]) == {"b1_real", "b1_s32"}
    # the export reads the two texts as one pair: segment ids 1 on the second text
    reference = np.load(ctx.artifacts["export"].file("parity_reference.npz"))
    assert reference["token_type_ids"].max() == 1
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["kind"] == "cross-encoder" and manifest["objective"] == "regression" and manifest["labels"] == []
    assert "spearman" in (run / "report.md").read_text().lower()


def test_the_regressor_bundle_scores_pairs_without_torch_as_measured(regression_run) -> None:
    ctx, run = regression_run
    report = json.loads((run / "report.json").read_text())
    measured = json.loads(ctx.artifacts[f"evaluate.{report['shipped']}"].file("metrics.json").read_text())
    items = [list(p) for p in zip(ctx.test.texts, ctx.test.pairs, strict=True)]
    got = _app(run / "bundle", "print(json.dumps((encoder.score(pairs) / 5.0).tolist()))", items)
    assert np.asarray(got) == pytest.approx(np.asarray(measured["test"]["scores"]), abs=1e-4)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, data_root: Path):
    """STS-B pairs labelled 'similar' (score >= 2.5) or 'different', in a data folder of the test's own."""
    folder = tmp_path_factory.mktemp("pairs-cls")
    root = folder / "data"
    root.mkdir()
    for split, rows in (("train", 96), ("dev", 30), ("test", 30)):
        with (data_root / "stsb" / f"{split}.tsv").open(encoding="utf-8", newline="") as f:
            reader = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
        lines = ["a\tb\tlabel"] + [
            f"{r['sentence1']}\t{r['sentence2']}\t{'similar' if float(r['score']) >= 2.5 else 'different'}"
            for r in reader
        ]
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = tiny_pair_recipe(tiny_model, "tiny-pair-cls")
    recipe["data"] = {
        "root": str(root),
        "train": "train.tsv",
        "eval": "dev.tsv",
        "test": "test.tsv",
        "text": "a",
        "text_pair": "b",
        "label": "label",
    }
    recipe.pop("pairs")  # classification is the default
    return _run(folder, recipe)


def test_a_pair_classifier_runs_end_to_end_and_its_bundle_predicts_as_measured(classification_run) -> None:
    ctx, run = classification_run
    report = json.loads((run / "report.json").read_text())
    assert report["objective"] == "classification" and report["data"]["labels"] == ["similar", "different"]
    by = {r["name"]: r for r in report["variants"]}
    assert by["pytorch-fp32"]["correct"] == round(by["pytorch-fp32"]["accuracy"] * 30)
    measured = json.loads(ctx.artifacts[f"evaluate.{report['shipped']}"].file("metrics.json").read_text())
    items = [list(p) for p in zip(ctx.eval.texts, ctx.eval.pairs, strict=True)]
    got = _app(run / "bundle", "print(json.dumps([p.label for p in encoder.predict(pairs)]))", items)
    assert got == [ctx.recipe.data.labels[k] for k in measured["eval"]["predictions"]]


def test_a_pair_recipe_that_cannot_run_is_refused_with_the_field(tmp_path: Path, tiny_model: Path) -> None:
    recipe = tiny_pair_recipe(tiny_model)
    recipe["data"]["labels"] = ["a", "b"]
    recipe["finetune"]["method"] = "qat"
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, recipe))
    assert "data.labels: a regression pair recipe reads a numeric score" in str(err.value)
    assert "finetune.method 'qat': pair recipes fine-tune with full" in str(err.value)
    single = tiny_pair_recipe(tiny_model)
    single["data"].pop("text_pair")
    with pytest.raises(RecipeError, match=r"pairs: a pair recipe names its second text's column in data\.text_pair"):
        load_recipe(write_recipe(tmp_path, single))


def test_node_scores_and_classifies_pairs_like_python(regression_run, classification_run) -> None:
    from tests.conftest import node_app_compare

    node_app_compare()  # installs the Node packages, or skips where node is missing (fails under .ci/run)
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        from check_node import compare_pairs
    finally:
        sys.path.pop(0)
    for ctx, run in (regression_run, classification_run):
        pairs = list(zip(ctx.test.texts, ctx.test.pairs, strict=True))
        long = (" ".join(ctx.test.texts[:12]), " ".join(ctx.test.pairs[:30]))  # past max_length together: cut
        found = compare_pairs(run / "bundle", [*pairs, long, (long[1], long[0])])
        assert found["max_abs_score_diff"] < 1e-4 and found["differ_rows"] == [], found
