"""Reading splits and batching by length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolchain.data import DataError, bucketed_batches, read_split


def test_sst2_dev_reads_all_rows(data_root: Path) -> None:
    split = read_split(data_root / "sst2/dev.tsv", "sentence", "label", ["negative", "positive"])
    assert len(split) == 872
    assert set(np.unique(split.labels)) == {0, 1}
    assert all(isinstance(t, str) and t == t.strip() for t in split.texts)
    assert len(split.sha256) == 64


def test_string_labels_and_formats(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",Sports\nmarkets fall,Business\n')
    rows = [{"text": "hello", "label": "Sports"}, {"text": "bye", "label": "World"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    labels = ["World", "Sports", "Business"]
    csv_split = read_split(tmp_path / "a.csv", "text", "label", labels)
    assert csv_split.texts == ["hello, world", "markets fall"] and csv_split.labels.tolist() == [1, 2]
    assert read_split(tmp_path / "a.jsonl", "text", "label", labels).labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sentence\tlabel\n", "empty"),
        ("sentence\tlabel\n3\t1\n", "must hold text"),
        ("sentence\tlabel\nfine\tmaybe\n", "'maybe'"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "x.tsv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_split(tmp_path / "x.tsv", "sentence", "label", ["negative", "positive"])


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unsupported file type"):
        read_split(tmp_path / "x.parquet", "t", "l", ["a", "b"])


def test_sample_is_seeded_subset(data_root: Path) -> None:
    split = read_split(data_root / "sst2/dev.tsv", "sentence", "label", ["negative", "positive"])
    a, b, c = split.sample(100, seed=1), split.sample(100, seed=1), split.sample(100, seed=2)
    assert a.texts == b.texts and a.texts != c.texts and len(a) == 100
    assert set(a.texts) <= set(split.texts)


def test_bucketed_batches_cover_each_row_once_with_little_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=5000).tolist()
    batches = list(bucketed_batches(lengths, 32, seed=0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(5000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # random batches would pad to ~1.8x
    assert [b for b in bucketed_batches(lengths, 32, seed=0)] == batches
    assert [b for b in bucketed_batches(lengths, 32, seed=1)] != batches


def test_labels_left_out_are_read_from_the_training_file(tmp_path: Path, data_root: Path) -> None:
    from toolchain.data import infer_labels

    # integer labels: '0'..'N-1'
    assert infer_labels(data_root / "sst2/train.tsv", data_root / "sst2/dev.tsv", "sentence", "label") == ["0", "1"]
    # names: in order of first appearance, whatever YAML would make of them
    train = tmp_path / "train.csv"
    train.write_text('text,label\nhi,what?\nyo,"a: b"\nok,#tag\nsure,what?\n')
    evl = tmp_path / "eval.csv"
    evl.write_text("text,label\nhm,#tag\n")
    labels = infer_labels(train, evl, "text", "label")
    assert labels == ["what?", "a: b", "#tag"]
    assert read_split(train, "text", "label", labels).labels.tolist() == [0, 1, 2, 0]
    # an eval label the training file lacks, named; integers that are not 0..N-1; a single label
    evl.write_text("text,label\nhm,never\n")
    with pytest.raises(DataError, match=r"eval\.csv: label\(s\) \['never'\] never appear in the training file"):
        infer_labels(train, evl, "text", "label")
    (tmp_path / "ints.tsv").write_text("t\tl\na\t1\nb\t3\n")
    with pytest.raises(DataError, match=r"integer labels must be 0\.\.N-1.*\[1, 3\]"):
        infer_labels(tmp_path / "ints.tsv", tmp_path / "ints.tsv", "t", "l")
    (tmp_path / "one.tsv").write_text("t\tl\na\tx\nb\tx\n")
    with pytest.raises(DataError, match="holds one label"):
        infer_labels(tmp_path / "one.tsv", tmp_path / "one.tsv", "t", "l")


def test_a_recipe_without_labels_gets_them_from_the_data_and_plans_like_the_explicit_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import yaml

    from toolchain.core.context import RunContext
    from toolchain.engine import planned_ids
    from toolchain.paths import PROJECT_ROOT
    from toolchain.recipe.load import load_recipe

    raw = yaml.safe_load((PROJECT_ROOT / "recipes" / "agnews-minilm-lora.yaml").read_text())
    del raw["data"]["labels"]
    path = tmp_path / "agnews-minilm-lora.yaml"
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level("INFO", logger="toolchain"):
        inferred = load_recipe(path)
    assert inferred.data.labels == ["Sci/Tech", "World", "Sports", "Business"]  # first appearance in train.tsv
    assert "read from agnews/train.tsv (names in order of first appearance): Sci/Tech, World, Sports, Business" in (
        caplog.text
    )
    explicit = load_recipe(path, [f"data.labels={json.dumps(inferred.data.labels)}"])

    def ids(recipe) -> dict[str, str]:
        return {c.key: s for c, s in planned_ids(RunContext(recipe, bf16_native=True))}

    assert ids(inferred) == ids(explicit)
