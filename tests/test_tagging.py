"""Token classification: span decoding with fixed tags (exact character offsets), BIO reading as seqeval's, the
recipe's checks, and a tiny tagger run end to end whose bundle finds entities in raw text without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import tiny_tagging_recipe, write_recipe
from toolchain.errors import RecipeError
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe
from toolchain.runtime import bio_entities, spans_from_tags, split_words

# --- spans from fixed tags ------------------------------------------------------------------------------------------


def _spans(text: str, tags: list[str]) -> list[tuple[str, int, int, str]]:
    words = split_words(text)
    assert len(words) == len(tags)
    return [(e.type, e.start, e.end, e.text) for e in spans_from_tags(text, words, tags)]


def test_spans_have_exact_character_offsets() -> None:
    from toolchain.report.tagging import EXAMPLES  # the sentences every report shows through the shipped bundle

    # a word the tokenizer cuts into several pieces, an entity at the very end
    text = EXAMPLES[0]
    assert _spans(text, ["O", "B-person", "O", "O", "B-location", "I-location", "I-location"]) == [
        ("person", 8, 17, "Gwendolyn"),
        ("location", 25, 46, "Empire State Building"),
    ]
    # emoji (one code point, two UTF-16 units) and CJK before an entity: offsets count Python characters
    text = EXAMPLES[1]
    assert _spans(text, ["O", "B-location", "O", "B-corporation"]) == [
        ("location", 2, 4, "東京"),
        ("corporation", 11, 16, "Apple"),
    ]
    # an I- tag with no B- starts an entity (as seqeval reads it); a type change inside a run starts another
    text = EXAMPLES[2]
    assert _spans(text, ["O", "I-product", "I-product", "O", "I-corporation"]) == [
        ("product", 5, 17, "iPhone   Pro"),
        ("corporation", 23, 28, "Apple"),
    ]
    assert _spans("a b", ["B-person", "I-group"]) == [("person", 0, 1, "a"), ("group", 2, 3, "b")]


@given(st.lists(st.sampled_from(["O", "B-a", "I-a", "B-b", "I-b"]), max_size=12))
def test_bio_entities_reads_tags_as_seqeval_does(tags: list[str]) -> None:
    from seqeval.metrics.sequence_labeling import get_entities

    assert bio_entities(tags) == [tuple(e) for e in get_entities(tags)]


# --- the recipe's checks ------------------------------------------------------------------------------------------


def test_a_row_whose_words_and_tags_differ_in_length_is_named(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    good = json.dumps({"tokens": ["Paris", "is", "big"], "tags": ["B-location", "O", "O"]})
    (root / "train.jsonl").write_text(good + "\n")
    (root / "dev.jsonl").write_text(good + "\n" + json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    (root / "test.jsonl").write_text(json.dumps({"tokens": ["Rome"], "tags": ["B-city"]}) + "\n")
    recipe = tiny_tagging_recipe(tiny_model)
    recipe["data"] |= {"root": str(root), "train": "train.jsonl", "eval": "dev.jsonl", "test": "test.jsonl"}
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, recipe))
    message = str(err.value)
    assert "dev.jsonl: row 2 has 2 words in 'tokens' but 1 tags in 'tags'; give each word one tag" in message
    assert "test.jsonl: row 1 has tag 'B-city', which is not in the tag set" in message


def test_a_tagging_recipe_reads_its_tag_set_from_the_training_file(tmp_path: Path, tiny_model: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_tagging_recipe(tiny_model)))
    assert recipe.data.labels[:3] == ["O", "B-corporation", "I-corporation"] and len(recipe.data.labels) == 13
    bad = tiny_tagging_recipe(tiny_model)
    bad["finetune"]["method"] = "lora"
    bad["data"]["text_pair"] = "tags"
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, bad))
    assert "finetune.method 'lora': tagging recipes fine-tune with full" in str(err.value)
    assert "data.text_pair: tagging recipes tag one word list per row" in str(err.value)


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tagging_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, data_root: Path):
    from toolchain import engine

    folder = tmp_path_factory.mktemp("tag")
    ctx = engine.run(load_recipe(write_recipe(folder, tiny_tagging_recipe(tiny_model))), folder / "runs")
    return ctx, folder / "runs" / "tiny-tag"


def test_the_tagger_runs_end_to_end(tagging_run) -> None:
    from toolchain.report.rows import tagger_rows

    ctx, run = tagging_run
    report = json.loads((run / "report.json").read_text())
    assert report["kind"] == "tagging" and report["metric"] == "entity_f1"
    assert len(tagger_rows().validate_python(report["variants"])) == 4
    by = {r["name"]: r for r in report["variants"]}
    assert set(by) == {"pytorch-fp32", "onnx-fp32", "onnx-fp32-optimized", "onnx-int8-dynamic"}
    for r in report["variants"]:
        assert set(r["f1"]) == {"eval", "test"} and r["accuracy"] == pytest.approx(r["f1"]["eval"] / 100)
    # the fp32 export predicts the PyTorch tags: no entity lost or gained
    assert by["onnx-fp32"]["entity_changes"]["lost"] == 0 and by["onnx-fp32"]["entity_changes"]["gained"] == 0
    from toolchain.report.tagging import EXAMPLES

    assert [e["text"] for e in report["examples"]] == EXAMPLES
    md = (run / "report.md").read_text()
    assert "entity F1 eval" in md and "Per entity type" in md and "Tagger.tag" in md
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["kind"] == "tagger" and manifest["labels"] == ctx.recipe.data.labels
    assert ctx.artifacts["bundle"].meta["raw_text_agreement"] == "30/30"
    assert report["raw_text_agreement"] == {"split": "test", "sentences": 30, "same_entities": 30}


def test_a_tagger_bundle_is_refused_by_the_other_runtimes_with_the_class_to_use(tagging_run) -> None:
    from toolchain.runtime import BundleError, CrossEncoder, Embedder, Predictor

    _, run = tagging_run
    with pytest.raises(BundleError, match="a tagger bundle; this class loads embedder bundles"):
        Embedder.load(run / "bundle")
    with pytest.raises(BundleError, match="a tagger bundle; this class loads cross-encoder bundles"):
        CrossEncoder.load(run / "bundle")
    with pytest.raises(BundleError, match="load it with Tagger"):
        Predictor.load(run / "bundle")


def test_the_bundle_tags_raw_text_without_torch_as_measured(tagging_run) -> None:
    ctx, run = tagging_run
    report = json.loads((run / "report.json").read_text())
    measured = json.loads(ctx.artifacts[f"evaluate.{report['shipped']}"].file("metrics.json").read_text())
    tags = ctx.recipe.data.labels
    words = ctx.test.words
    want = [
        sorted((k, " ".join(ws[a : b + 1])) for k, a, b in bio_entities([tags[t] for t in predicted]))
        for ws, predicted in zip(words, measured["test"]["predicted"], strict=True)
    ]
    app = textwrap.dedent(
        """
        import json, sys
        sys.modules["torch"] = None  # an app installs no torch: importing it fails
        sys.modules["transformers"] = None
        from toolchain.runtime import Tagger
        tagger = Tagger.load(sys.argv[1], threads=1)
        found = tagger.tag(json.loads(sys.stdin.read()))
        print(json.dumps([sorted([e.type, e.text] for e in spans) for spans in found]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", app, str(run / "bundle")],
        input=json.dumps([" ".join(ws) for ws in words]),
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=True,
    )
    assert json.loads(out.stdout) == [[list(e) for e in sentence] for sentence in want]


def test_node_finds_the_entities_python_finds(tagging_run) -> None:
    from tests.conftest import node_app_compare

    node_app_compare()  # installs the Node packages, or skips where node is missing (fails under .ci/run)
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        from check_node import compare_tags
    finally:
        sys.path.pop(0)
    ctx, run = tagging_run
    from toolchain.report.tagging import EXAMPLES

    texts = [" ".join(ws) for ws in ctx.test.words] + EXAMPLES + ["x " * 80 + "Paris"]  # the last one cut off
    found = compare_tags(run / "bundle", texts)
    assert found["agree"] == found["rows"], [(found["python"][i], found["node"][i]) for i in found["differ_rows"]]
