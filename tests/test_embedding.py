"""Sentence embeddings: the metrics, the recipe's checks, and a tiny embedder run end to end (fine-tuned on STS-B
pairs, exported with its pooling in the graph, quantized, measured, shipped), whose bundle embeds in a process without
torch what the evaluate stage measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_embedding_recipe, write_recipe
from toolchain.data import DataError, read_scored_pairs
from toolchain.embed.metrics import correlations, moved_pairs, neighbours_kept, pair_cosines
from toolchain.errors import RecipeError
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe

# --- metrics ------------------------------------------------------------------------------------------------------


def test_correlations_are_scipys_times_100() -> None:
    predicted = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    gold = np.array([0.0, 2.0, 1.0, 4.0, 5.0])
    got = correlations(predicted, gold)
    assert got["spearman"] == pytest.approx(100.0)  # the same order
    assert got["pearson"] == pytest.approx(100 * np.corrcoef(predicted, gold)[0, 1])
    assert correlations(-predicted, gold)["spearman"] == pytest.approx(-100.0)


def test_neighbours_kept_is_one_for_the_same_vectors_and_falls_when_the_space_is_scrambled() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    assert neighbours_kept(x, x, 5) == 1.0
    assert neighbours_kept(x, x * 3.0, 5) == 1.0  # cosine: the scale does not matter
    assert neighbours_kept(x, x + 1e-4 * rng.normal(size=x.shape), 5) > 0.9
    assert neighbours_kept(x, rng.normal(size=x.shape), 5) < 0.5


def test_moved_pairs_lists_the_largest_change_first() -> None:
    ref = np.array([0.5, 0.5, 0.5])
    var = np.array([0.55, 0.2, 0.49])
    moved = moved_pairs(ref, var, ["a", "b", "c"], ["x", "y", "z"], np.array([1.0, 2.0, 3.0]), keep=2)
    assert [m["row"] for m in moved] == [1, 0]
    assert moved[0] == {
        "row": 1,
        "text": "b",
        "text_pair": "y",
        "gold": 2.0,
        "fp32_cosine": 0.5,
        "variant_cosine": 0.2,
    }
    assert pair_cosines(np.array([[1.0, 0.0]]), np.array([[2.0, 0.0]]))[0] == pytest.approx(1.0)


# --- the recipe's checks ------------------------------------------------------------------------------------------


def test_a_score_outside_the_range_is_named_with_its_row(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("sentence1\tsentence2\tscore\na\tb\t4.5\nc\td\t7.0\n")
    with pytest.raises(DataError, match=r"pairs\.tsv: column 'score' row 2 has 7\.0, not a score in 0\.\.5"):
        read_scored_pairs(path, "sentence1", "sentence2", "score", 5.0)
    path.write_text("sentence1\tsentence2\tscore\na \tb\t4.5\nc\td\t0\n")
    split = read_scored_pairs(path, "sentence1", "sentence2", "score", 5.0)
    assert split.texts == ["a", "c"] and split.pairs == ["b", "d"] and split.labels.tolist() == [4.5, 0.0]
    assert split.sample(1, seed=0).pairs in (["b"], ["d"]) and split.head(1).pairs == ["b"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["data"].pop("text_pair"), r"data\.text_pair: embedding recipes are measured on scored pairs"),
        (lambda r: r["data"].__setitem__("labels", ["a", "b"]), r"data\.labels: embedding recipes read a numeric"),
        (lambda r: r["finetune"].__setitem__("method", "lora"), r"finetune\.method 'lora': embedding recipes"),
        (
            lambda r: r["compile"].__setitem__("quantize", ["static-int8"]),
            r"compile\.quantize onnx-int8-static-minmax: embedding recipes take dynamic-int8 and fp16",
        ),
        (
            lambda r: r["budget"].__setitem__("max_accuracy_drop", 0.5),
            r"max_metric_drop and max_accuracy_drop are the same limit",
        ),
        (lambda r: r["data"].__setitem__("label", "sentence1"), r"column 'sentence1' row 1 has .*not a score"),
        (lambda r: r["embedding"].__setitem__("corpus_text", "body"), r"embedding\.corpus_text: .* no column 'body'"),
    ],
)
def test_an_embedding_recipe_that_cannot_run_is_refused_with_the_field(
    tmp_path: Path, tiny_model: Path, change, message: str
) -> None:
    recipe = tiny_embedding_recipe(tiny_model)
    change(recipe)
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, recipe))


def test_a_test_split_and_no_fine_tuning_are_refused_in_a_classifier_recipe(tmp_path: Path, tiny_model: Path) -> None:
    from tests.conftest import tiny_recipe_dict

    recipe = tiny_recipe_dict(tiny_model)
    recipe["data"] |= {"test": "sst2/heldout.tsv"}
    recipe["finetune"]["method"] = "none"
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, recipe))
    assert "data.test: read by embedding, tagging and pair recipes only" in str(err.value)
    assert "finetune.method 'none': only embedding recipes run without fine-tuning" in str(err.value)


def test_max_metric_drop_is_the_alias_of_max_accuracy_drop(tmp_path: Path, tiny_model: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_embedding_recipe(tiny_model)))
    assert recipe.budget.max_accuracy_drop == 1.0
    assert recipe.bench.optimum_baseline is False and recipe.bench.openvino_peers is False


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, data_root: Path):
    from toolchain import engine

    folder = tmp_path_factory.mktemp("emb")
    runs = folder / "runs"
    ctx = engine.run(load_recipe(write_recipe(folder, tiny_embedding_recipe(tiny_model))), runs)
    return ctx, runs / "tiny-emb"


def test_the_embedder_runs_end_to_end_with_pooling_in_the_graph(embedding_run) -> None:
    import onnx

    ctx, run = embedding_run
    report = json.loads((run / "report.json").read_text())
    assert report["kind"] == "embedding" and report["metric"] == "spearman"
    from toolchain.report.rows import embedder_rows

    assert len(embedder_rows().validate_python(report["variants"])) == 5  # exactly the typed rows, no key more
    by = {r["name"]: r for r in report["variants"]}
    assert set(by) == {
        "pytorch-fp32",
        "onnx-fp32",
        "onnx-fp32-untuned",
        "onnx-fp32-optimized",
        "onnx-int8-dynamic",
    }
    assert by["onnx-fp32-untuned"]["reference"] is True
    assert report["verdicts"]["onnx-fp32-untuned"] == "reference (measured, not a candidate)"
    assert report["data"]["test_rows"] == 40 and report["data"]["eval_rows"] == 40
    for r in report["variants"]:
        assert set(r["spearman"]) == {"eval", "test"}
        assert r["accuracy"] == pytest.approx(r["spearman"]["eval"] / 100)
    # the fp32 export is the PyTorch embedder: the same Spearman, fidelity ~1, every neighbour kept
    assert by["onnx-fp32"]["spearman"]["eval"] == pytest.approx(by["pytorch-fp32"]["spearman"]["eval"], abs=0.05)
    fid = by["onnx-fp32"]["fidelity"]
    assert fid["mean_cosine_eval"] > 0.9999 and fid["neighbours_kept"] > 0.95 and fid["corpus_texts"] == 30
    assert by["pytorch-fp32"]["fidelity"] is None
    assert len(by["onnx-int8-dynamic"]["moved_pairs"]) == 5
    # pooling and normalization are in the graph: one (batch, dimension) output
    graph = onnx.load(str(ctx.artifacts["export"].file("model.onnx"))).graph
    assert [o.name for o in graph.output] == ["embeddings"]
    assert {n.op_type for n in graph.node} >= {"ReduceSum", "Div"}
    md = (run / "report.md").read_text()
    assert "Spearman eval" in md and "Where the metric went" in md
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["kind"] == "embedder" and manifest["dimension"] == 32 and manifest["normalized"] is True
    assert manifest["variant"] == report["shipped"]
    assert [i["from"] for i in manifest["inputs"]] == ["ids", "attention_mask", "type_ids"]


def test_the_bundle_embeds_without_torch_what_was_measured(embedding_run) -> None:
    ctx, run = embedding_run
    report = json.loads((run / "report.json").read_text())
    measured = np.load(ctx.artifacts[f"evaluate.{report['shipped']}"].file("embeddings.npz"))["eval"]
    texts = ctx.eval.texts + (ctx.eval.pairs or [])
    app = textwrap.dedent(
        """
        import json, sys
        sys.modules["torch"] = None  # an app installs no torch: importing it fails
        sys.modules["transformers"] = None
        from toolchain.runtime import Embedder
        embedder = Embedder.load(sys.argv[1], threads=1)
        print(json.dumps(embedder.embed(json.loads(sys.stdin.read())).tolist()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", app, str(run / "bundle")],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=True,
    )
    got = np.asarray(json.loads(out.stdout), dtype=np.float32)
    assert got.shape == measured.shape
    assert float((got * measured).sum(-1).min()) > 0.9999
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)


def test_an_embedding_bundle_is_refused_by_the_classifier_runtime(embedding_run) -> None:
    from toolchain.runtime import BundleError, Embedder, Predictor

    _, run = embedding_run
    with pytest.raises(BundleError, match="load it with Embedder"):
        Predictor.load(run / "bundle")
    assert Embedder.load(run / "bundle").embed([]).shape == (0, 32)


def test_the_untuned_embedder_is_not_trained_and_a_rerun_reuses_everything(embedding_run) -> None:
    from toolchain import engine

    ctx, run = embedding_run
    assert ctx.artifacts["pretrained"].meta["method"] == "none"
    assert "train_pairs" in ctx.artifacts["finetune"].meta
    again = engine.run(ctx.recipe, run.parent)
    assert {r.status for r in again.records} == {"reused"}


def test_method_none_compresses_the_pretrained_embedder_without_an_untuned_row(
    tmp_path: Path, tiny_model: Path
) -> None:
    from toolchain import engine
    from toolchain.core.context import RunContext

    recipe = tiny_embedding_recipe(tiny_model, "tiny-none")
    recipe["finetune"]["method"] = "none"
    loaded = load_recipe(write_recipe(tmp_path, recipe))
    calls, variants = engine.task_for(loaded).plan(RunContext(loaded, tmp_path / "runs"))
    assert "onnx-fp32-untuned" not in {v.name for v in variants}
    assert "train_sha256" not in calls[0].identity  # nothing trained: the train file does not key the model


def test_the_search_example_prints_the_five_closest_corpus_texts(embedding_run, data_root: Path) -> None:
    _, run = embedding_run
    out = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "examples" / "search.py"), str(run / "bundle"), "oil prices and stocks"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "TOOLCHAIN_DATA": str(data_root)},
        check=True,
    )
    lines = out.stdout.splitlines()
    scores = [float(line.split()[0]) for line in lines]
    assert len(lines) == 5 and scores == sorted(scores, reverse=True)


def test_node_embeds_like_python(embedding_run) -> None:
    from tests.conftest import node_app_compare

    node_app_compare()  # installs the Node packages, or skips where node is missing (fails under .ci/run)
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        from check_node import compare_embeddings
    finally:
        sys.path.pop(0)
    ctx, run = embedding_run
    texts = ctx.eval.texts[:20] + (ctx.eval.pairs or [])[:20]
    found = compare_embeddings(run / "bundle", texts)
    assert found["rows"] == 40 and found["min_cosine"] >= 0.9999


def onnx_layers(path: Path) -> int:
    """Transformer layers in an exported graph: its Softmax nodes (one per attention)."""
    import onnx

    return sum(n.op_type == "Softmax" for n in onnx.load(str(path)).graph.node)


def test_a_distilled_student_embedder_is_built_measured_and_shipped(tmp_path: Path, tiny_model: Path) -> None:
    from toolchain import engine

    recipe = tiny_embedding_recipe(tiny_model, "tiny-emb-student")
    recipe["compile"]["distill"] = {"num_layers": 1, "epochs": 1, "lr": 1.0e-3, "batch_size": 16, "max_length": 32}
    ctx = engine.run(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "runs")
    report = json.loads((tmp_path / "runs" / "tiny-emb-student" / "report.json").read_text())
    by = {r["name"]: r for r in report["variants"]}
    # the student is compiled beside the fine-tuned embedder: both branches are candidates
    student = {"pytorch-fp32-student", "onnx-fp32-student", "onnx-fp32-optimized-student", "onnx-int8-dynamic-student"}
    assert student | {"pytorch-fp32", "onnx-fp32", "onnx-int8-dynamic"} <= set(by)
    assert ctx.artifacts["distill"].meta["kept_layers"] == [1]
    assert by["onnx-fp32-student"]["spearman"] == pytest.approx(by["pytorch-fp32-student"]["spearman"], abs=0.05)
    assert by["pytorch-fp32-student"]["fidelity"]["eval_texts"] == 80
    assert by["onnx-fp32-student"]["size_bytes"] < by["onnx-fp32"]["size_bytes"]
    graph = onnx_layers(ctx.artifacts["export.student"].file("model.onnx"))
    assert graph == 1 and onnx_layers(ctx.artifacts["export"].file("model.onnx")) == 2
    bad = tiny_embedding_recipe(tiny_model, "bad")
    bad["compile"]["distill"] = {"num_layers": 1, "temperature": 2.0}
    with pytest.raises(RecipeError, match=r"compile\.distill\.temperature: an embedder's student learns"):
        load_recipe(write_recipe(tmp_path, bad))
