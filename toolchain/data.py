"""Labelled text splits from local TSV/CSV/JSONL files, read through `datasets`.

Labels come as names (AG News: "Sports") or as integer indices into the recipe's `labels` (SST-2: 0/1);
either way a split holds integer class ids in the recipe's order. Scored pairs (STS-B) hold float scores and each
row's second text; tagged words (WNUT-17) hold each row's words and tag ids.
"""

# long: one reader per kind of split (labelled texts, scored pairs, tagged words) beside the Split they all return and
# the checks every recipe's data gets before any compute

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolchain.runtime import sha256_file

if TYPE_CHECKING:
    from toolchain.recipe.schema import Recipe

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass(frozen=True)
class Split:
    """One labelled split: texts and integer class ids (or, for scored pairs, each pair's second text and its float
    score), plus where it came from."""

    path: Path
    texts: list[str]
    labels: np.ndarray  # (rows,) int64 class ids; float64 scores for scored pairs
    sha256: str
    pairs: list[str] | None = None  # the second text of each row (data.text_pair)
    words: list[list[str]] | None = None  # tagging: each row's words (texts are them joined by spaces)
    tags: list[list[int]] | None = None  # tagging: each word's tag id, indices into the recipe's labels

    def __len__(self) -> int:
        return len(self.texts)

    def _rows(self, idx: list[int]) -> Split:
        def pick(xs: list[Any] | None) -> Any:
            return [xs[i] for i in idx] if xs is not None else None

        return Split(
            self.path,
            pick(self.texts),
            self.labels[idx],
            self.sha256,
            pick(self.pairs),
            pick(self.words),
            pick(self.tags),
        )

    def head(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        return self._rows(list(range(n)))

    def sample(self, n: int | None, seed: int) -> Split:
        """A seeded random subset of n rows (the whole split when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        return self._rows(sorted(random.Random(seed).sample(range(len(self)), n)))


def text_items(split: Split) -> list[Any]:
    """What a model reads of each row: its text, or (text, text_pair) for a pair recipe (a cross-encoder)."""
    return list(zip(split.texts, split.pairs, strict=True)) if split.pairs is not None else list(split.texts)


class DataError(ValueError):
    """A data file does not fit the recipe; the message names the file, the column and the fix."""


@lru_cache(maxsize=16)
def _load_columns(path: Path, mtime_ns: int) -> dict[str, list]:
    """All columns of a file as python lists (cached per file version)."""
    from datasets import disable_progress_bars, load_dataset  # heavy import, deferred

    disable_progress_bars()  # a local file reads in well under a second; its bar is noise in the run log

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .tsv, .csv or .jsonl")
    with path.open("rb") as f:
        non_empty = sum(1 for _, line in zip(range(2), f, strict=False) if line.strip())
    if non_empty < (1 if fmt == "jsonl" else 2):
        raise DataError(f"{path}: the split is empty (no data rows{'' if fmt == 'jsonl' else ' after the header'})")
    if fmt == "jsonl":
        ds = load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    else:
        # SST-2/AG News fields are unquoted and may contain quote characters: read them with QUOTE_NONE.
        kwargs = {"sep": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        ds = load_dataset("csv", data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    return ds.to_dict()


def read_split(path: Path, text: str, label: str, labels: list[str]) -> Split:
    """Read one split and map its labels to class ids. Raises DataError with a precise message."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.root or $TOOLCHAIN_DATA to the folder that holds it)")
    try:
        cols = _load_columns(path, path.stat().st_mtime_ns)
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as {path.suffix} ({type(e).__name__}: {e})") from None
    missing = [c for c in (text, label) if c not in cols]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; the file has: {', '.join(cols)}")
    texts, raw = cols[text], cols[label]
    if not texts:
        raise DataError(f"{path}: the split is empty (no data rows after the header)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(
                f"{path}: column {text!r} must hold text, row {i + 1} has {t!r} ({type(t).__name__}); "
                "check data.text names the text column"
            )
    ids = np.empty(len(raw), dtype=np.int64)
    index = {name: i for i, name in enumerate(labels)}
    for i, v in enumerate(raw):
        if isinstance(v, bool) or v is None:
            cid = None
        elif isinstance(v, int | np.integer):
            cid = int(v) if 0 <= int(v) < len(labels) else None
        else:
            cid = index.get(str(v).strip())
        if cid is None:
            raise DataError(
                f"{path}: column {label!r} row {i + 1} has {v!r}, which is not one of data.labels "
                f"{labels} nor an index 0..{len(labels) - 1}; fix data.labels or the file"
            )
        ids[i] = cid
    return Split(path, [t.strip() for t in texts], ids, sha256_file(path))


def read_scored_pairs(path: Path, text: str, text_pair: str, score: str, score_max: float) -> Split:
    """A split of text pairs with a numeric gold score in 0..score_max (STS-B). Raises DataError naming the file,
    the row and the fix."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.root or $TOOLCHAIN_DATA to the folder that holds it)")
    try:
        cols = _load_columns(path, path.stat().st_mtime_ns)
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as {path.suffix} ({type(e).__name__}: {e})") from None
    missing = [c for c in (text, text_pair, score) if c not in cols]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; the file has: {', '.join(cols)}")
    firsts, seconds, raw = cols[text], cols[text_pair], cols[score]
    for column, values in ((text, firsts), (text_pair, seconds)):
        for i, t in enumerate(values):
            if not isinstance(t, str):
                raise DataError(
                    f"{path}: column {column!r} must hold text, row {i + 1} has {t!r} ({type(t).__name__}); "
                    "check data.text and data.text_pair name the two text columns"
                )
    scores = np.empty(len(raw), dtype=np.float64)
    for i, v in enumerate(raw):
        ok = isinstance(v, int | float | np.number) and not isinstance(v, bool) and 0 <= float(v) <= score_max
        if not ok:
            raise DataError(
                f"{path}: column {score!r} row {i + 1} has {v!r}, not a score in 0..{score_max:g}; fix the file, "
                "data.label (the score column) or embedding.score_max"
            )
        scores[i] = float(v)
    return Split(path, [t.strip() for t in firsts], scores, sha256_file(path), [t.strip() for t in seconds])


def _tagged_columns(path: Path, words: str, tags: str) -> tuple[list[Any], list[Any]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.root or $TOOLCHAIN_DATA to the folder that holds it)")
    try:
        cols = _load_columns(path, path.stat().st_mtime_ns)
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as {path.suffix} ({type(e).__name__}: {e})") from None
    missing = [c for c in (words, tags) if c not in cols]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; the file has: {', '.join(cols)}")
    return cols[words], cols[tags]


def read_tagged(path: Path, words: str, tags: str, tagset: list[str]) -> Split:
    """A split of word lists with one tag per word (JSON Lines: {"tokens": [...], "tags": [...]}), tags mapped to
    indices into `tagset`. Raises DataError naming the file, the row and the fix."""
    all_words, all_tags = _tagged_columns(path, words, tags)
    index = {t: i for i, t in enumerate(tagset)}
    ids: list[list[int]] = []
    for i, (ws, ts) in enumerate(zip(all_words, all_tags, strict=True)):
        if not isinstance(ws, list) or not all(isinstance(w, str) for w in ws) or not isinstance(ts, list):
            raise DataError(
                f"{path}: row {i + 1}: {words!r} and {tags!r} must be lists (of words, of tags); check data.text "
                "and data.label name them"
            )
        if len(ws) != len(ts):
            raise DataError(
                f"{path}: row {i + 1} has {len(ws)} words in {words!r} but {len(ts)} tags in {tags!r}; give each "
                "word one tag"
            )
        unknown = [t for t in ts if t not in index]
        if unknown:
            raise DataError(
                f"{path}: row {i + 1} has tag {unknown[0]!r}, which is not in the tag set {tagset}; fix the file or "
                "data.labels (left out: the tags of the training file)"
            )
        ids.append([index[t] for t in ts])
    clean = [[w.strip() or "_" for w in ws] for ws in all_words]  # a word of spaces would vanish in the tokenizer
    return Split(
        path, [" ".join(ws) for ws in clean], np.zeros(len(clean), np.int64), sha256_file(path), None, clean, ids
    )


def infer_tags(train: Path, words: str, tags: str) -> list[str]:
    """The tag set of a tagging recipe that leaves data.labels out: O first, then B-/I- of each type in type order."""
    _, all_tags = _tagged_columns(train, words, tags)
    seen = {t for ts in all_tags if isinstance(ts, list) for t in ts if isinstance(t, str)}
    bad = sorted(t for t in seen if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2))
    if bad:
        raise DataError(f"{train}: tags {bad[:5]} are not BIO tags (O, B-<type>, I-<type>)")
    types = sorted({t[2:] for t in seen if t != "O"})
    return ["O", *(f"{p}-{t}" for t in types for p in ("B", "I"))]


def read_recipe_split(recipe: Recipe, path: Path) -> Split:
    """A split as the recipe reads it: labelled texts, scored pairs (embedding), or tagged words (tagging)."""
    d = recipe.data
    if recipe.tagging is not None:
        return read_tagged(path, d.text, d.label, d.labels)
    if recipe.embedding is not None or recipe.pair_regression:
        assert d.text_pair is not None  # the schema requires it
        top = recipe.embedding.score_max if recipe.embedding is not None else recipe.pairs.score_max  # type: ignore[union-attr]
        return read_scored_pairs(path, d.text, d.text_pair, d.label, top)
    split = read_split(path, d.text, d.label, d.labels)
    if d.text_pair is None:
        return split
    seconds = read_columns(path).get(d.text_pair)
    if seconds is None:
        raise DataError(
            f"{path}: no column {d.text_pair!r} (data.text_pair); the file has: {', '.join(read_columns(path))}"
        )
    bad = next((i for i, t in enumerate(seconds) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"{path}: column {d.text_pair!r} must hold text, row {bad + 1} has {seconds[bad]!r}")
    return Split(path, split.texts, split.labels, split.sha256, [t.strip() for t in seconds])


def read_columns(path: Path) -> dict[str, list[Any]]:
    """All columns of a data file (.tsv, .csv, .jsonl) as lists, cached per file version."""
    return _load_columns(path, path.stat().st_mtime_ns)


def _label_column(path: Path, text: str, label: str) -> list[Any]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.root or $TOOLCHAIN_DATA to the folder that holds it)")
    try:
        cols = _load_columns(path, path.stat().st_mtime_ns)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as {path.suffix} ({type(e).__name__}: {e})") from None
    missing = [c for c in (text, label) if c not in cols]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; the file has: {', '.join(cols)}")
    return list(cols[label])


def _is_index(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def infer_labels(train: Path, eval_file: Path, text: str, label: str) -> list[str]:
    """The label names of a recipe that leaves data.labels out, read from the whole training file: integer labels
    must be 0..N-1 and are named '0'..'N-1'; names come in order of first appearance. An eval label the training file
    lacks is an error naming it."""
    raw = _label_column(train, text, label)
    bad = next((v for v in raw if v is None or isinstance(v, bool | float)), "none")
    if bad != "none":
        raise DataError(f"{train}: column {label!r} holds {bad!r}; labels must be names or integers 0..N-1")
    if raw and all(_is_index(v) for v in raw):
        seen = sorted({int(v) for v in raw})
        if seen != list(range(len(seen))):
            raise DataError(
                f"{train}: integer labels must be 0..N-1 (class indices); column {label!r} holds {seen[:10]}. "
                "Give data.labels, or write the labels as names"
            )
        labels = [str(i) for i in seen]
        evl = {str(int(v)) if _is_index(v) else str(v).strip() for v in _label_column(eval_file, text, label)}
    else:
        labels = list(dict.fromkeys(str(v).strip() for v in raw))
        evl = {str(v).strip() for v in _label_column(eval_file, text, label)}
    if len(labels) < 2:
        raise DataError(f"{train}: column {label!r} holds one label ({labels}); a classifier needs at least 2")
    unseen = sorted(evl - set(labels))
    if unseen:
        raise DataError(
            f"{eval_file}: label(s) {unseen[:5]} never appear in the training file {train.name}, whose labels are "
            f"{labels[:20]}; fix the files or give data.labels"
        )
    return labels


def load_splits(recipe: Recipe) -> tuple[Split, Split]:
    """(train, eval) as the recipe asks: train sampled to max_train_rows, eval cut to max_eval_rows."""
    d = recipe.data
    root = recipe.data_root()
    train = read_recipe_split(recipe, root / d.train).sample(d.max_train_rows, recipe.finetune.seed)
    evl = read_recipe_split(recipe, root / d.eval).head(d.max_eval_rows)
    return train, evl


def load_test(recipe: Recipe) -> Split | None:
    """The recipe's second held-out split (data.test, reported beside eval), or None."""
    if recipe.data.test is None:
        return None
    return read_recipe_split(recipe, recipe.data_root() / recipe.data.test).head(recipe.data.max_eval_rows)


def check_data(recipe: Recipe) -> list[str]:
    """Problems with the recipe's data, as `data.<field>: message` lines (empty when all is well)."""
    d = recipe.data
    root = recipe.data_root()
    if not root.is_dir():
        return [f"data.root: folder {root} does not exist; set data.root or $TOOLCHAIN_DATA"]
    problems = []
    files = {"data.train": d.train, "data.eval": d.eval}
    if d.test is not None:
        files["data.test"] = d.test
    if recipe.finetune.validation is not None:
        files["finetune.validation.file"] = recipe.finetune.validation.file
    for i, q in enumerate(recipe.compile.quantize):
        if q.auto_file is not None:
            files[f"compile.quantize.{i}.auto_file"] = q.auto_file
    hashes: dict[str, str] = {}
    for field, rel in files.items():
        path = root / rel
        try:
            outside = not path.resolve().is_relative_to(root.resolve())
            path.is_file()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long for the file system
            problems.append(f"{field}: '{rel}' is not a path this machine can open ({type(e).__name__}: {e})")
            continue
        if not d.allow_outside_root and outside:
            problems.append(
                f"{field}: '{rel}' leads outside the data root {root} (to {path.resolve()}); move the file under the "
                "root, point data.root at its folder, or set data.allow_outside_root: true"
            )
            continue
        try:
            hashes[field] = read_recipe_split(recipe, path).sha256
        except DataError as e:
            problems.append(f"{field}: {e}")
    if recipe.embedding is not None and recipe.embedding.corpus is not None:
        problems += check_corpus(root, recipe.embedding.corpus, recipe.embedding.corpus_text)
    for field, sha in hashes.items():  # the rows accuracy is reported on never train, select or decide anything
        if field not in ("data.eval", "data.test") and sha in (hashes.get("data.eval"), hashes.get("data.test")):
            problems.append(
                f"{field}: '{files[field]}' has the same rows as data.eval ('{d.eval}'), so the reported accuracy "
                "would be measured on rows that trained or chose the model; use a held-out file (e.g. sst2/heldout.tsv)"
            )
    return problems


def check_corpus(root: Path, rel: str, column: str) -> list[str]:
    """Problems with an embedding recipe's neighbour corpus (embedding.corpus)."""
    path = root / rel
    if not path.is_file():
        return [f"embedding.corpus: {path}: file not found; name a text file under the data root, or set it to null"]
    try:
        cols = read_columns(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return [f"embedding.corpus: {path}: cannot be read ({type(e).__name__}: {e})"]
    if column not in cols:
        return [f"embedding.corpus_text: {path} has no column {column!r}; it has: {', '.join(cols)}"]
    return []


def read_corpus(path: Path, column: str, rows: int) -> list[str]:
    """The first `rows` texts of a corpus file's column."""
    return [str(t).strip() for t in read_columns(path)[column][:rows]]


def load_validation(recipe: Recipe) -> Split | None:
    """The validation split for early stopping (first `max_rows` rows), or None when the recipe sets none."""
    v = recipe.finetune.validation
    if v is None:
        return None
    d = recipe.data
    return read_split(recipe.data_root() / v.file, d.text, d.label, d.labels).head(v.max_rows)


def bucketed_batches(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length, in a seeded random order.

    Rows are shuffled, cut into pools of 50 batches, each pool sorted by length and cut into batches, and the
    batches shuffled: padding per batch stays small while the order stays random.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    yield from batches
