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
