"""Every bad input the toolchain is known to meet, through the CLI as a user meets it: exit code 2, a message that
names the file, the field and the fix, no traceback, nothing computed. The table of bad inputs in docs/reliability.md
is this list with the messages the CLI printed; the last test fails when the two drift apart
(TOOLCHAIN_UPDATE_README=1 rewrites that table)."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict, write_recipe

from toolchain.cli import main
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.schema import resolve_data_root

Case = namedtuple("Case", "what make expect")


def _recipe(*changes: Callable[[dict, Path], None]) -> Callable[[Path, Path], list[str]]:
    """A case that edits a valid tiny recipe and validates it."""

    def make(tmp: Path, model: Path) -> list[str]:
        data = tiny_recipe_dict(model)
        for change in changes:
            change(data, tmp)
        return ["validate", str(write_recipe(tmp, data))]

    return make


def _text(text: str | bytes) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, model: Path) -> list[str]:
        path = tmp / "recipe.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["validate", str(path)]

    return make


def _data_file(name: str, content: str, field: str = "train") -> Callable[[dict, Path], None]:
    def change(data: dict, tmp: Path) -> None:
        (tmp / "d").mkdir(exist_ok=True)
        shutil.copy(resolve_data_root(data["data"].get("root")) / "sst2" / "dev.tsv", tmp / "d" / "dev.tsv")
        (tmp / "d" / name).write_text(content)
        data["data"].update(root=str(tmp), train="d/dev.tsv", eval="d/dev.tsv")
        data["data"][field] = f"d/{name}"

    return change


def _linked_out(data: dict, tmp: Path) -> None:
    root = tmp / "root"
    (root / "sst2").mkdir(parents=True)
    outside = tmp / "elsewhere.tsv"
    shutil.copy(resolve_data_root(None) / "sst2" / "dev.tsv", outside)
    (root / "sst2" / "dev.tsv").symlink_to(outside)
    shutil.copy(resolve_data_root(None) / "sst2" / "dev.tsv", root / "sst2" / "train.tsv")
    data["data"].update(root=str(root), train="sst2/train.tsv", eval="sst2/dev.tsv")


def _model_folder(edit: Callable[[Path], None]) -> Callable[[dict, Path], None]:
    def change(data: dict, tmp: Path) -> None:
        folder = tmp / "model"
        shutil.copytree(data["model"]["source"], folder)
        edit(folder)
        data["model"]["source"] = str(folder)

    return change


def _pickled(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")


def _remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_x.X"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_x.py").write_text("import os\n")


def _architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))


def _drop_labels(data: dict, tmp: Path) -> None:
    del data["data"]["labels"]


def _short_positions(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))


def _bpe_tokenizer(folder: Path) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = None  # no BertNormalizer: onnxruntime-extensions' BertTokenizer op would not match it
    (folder / "tokenizer.json").write_text(json.dumps(spec))


def _set(path: str, value: object) -> Callable[[dict, Path], None]:
    def change(data: dict, tmp: Path) -> None:
        *parents, key = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value

    return change


def _with_override(override: str) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, model: Path) -> list[str]:
        return [*_recipe()(tmp, model), override]

    return make


def _duplicate_key(tmp: Path, model: Path) -> list[str]:
    path = write_recipe(tmp, tiny_recipe_dict(model))
    path.write_text(path.read_text().replace("  lr: 0.003\n", "  lr: 0.003\n  lr: 0.0003\n"))
    return ["validate", str(path)]


def _copied_under_another_name(tmp: Path, model: Path) -> list[str]:
    return ["validate", str(write_recipe(tmp, {**tiny_recipe_dict(model), "name": "sst2-minilm"}, name="my-try"))]


def _outside_project(data: dict, tmp: Path) -> None:
    data["model"]["source"] = os.path.relpath(data["model"]["source"], PROJECT_ROOT)


def _rename(old: str, new: str) -> Callable[[dict, Path], None]:
    def change(data: dict, tmp: Path) -> None:
        section, key = old.split(".")
        data[section][new] = data[section].pop(key)

    return change


def _task(section: str, fields: dict, files: dict | None = None) -> Callable[[Path, Path], list[str]]:
    """A case that makes the tiny recipe an embedding or tagging recipe over `fields` (data files written into the
    case's folder when `files` gives them) and validates it."""

    def make(tmp: Path, model: Path) -> list[str]:
        data = tiny_recipe_dict(model)
        data["data"] = dict(fields)
        for name, content in (files or {}).items():
            (tmp / name).write_text(content)
            data["data"]["root"] = str(tmp)
        data[section] = {}
        return ["validate", str(write_recipe(tmp, data))]

    return make


_WORDS = json.dumps({"tokens": ["Paris", "is", "big"], "tags": ["B-location", "O", "O"]}) + "\n"
_TAGGED = {"text": "tokens", "label": "tags", "train": "train.jsonl", "eval": "dev.jsonl"}

CASES = [
    Case("recipe file that does not exist", lambda tmp, m: ["validate", str(tmp / "nope.yaml")], "no such recipe file"),
    Case("malformed YAML", _text("name: bad\nmodel:\n  source: [unclosed\n"), "malformed YAML at line 4, column 1"),
    Case("a file that is not UTF-8 text", _text(b"name: \xff\xfe\x00bad"), "cannot be read as YAML"),
    Case("top level is a list, not sections", _text("- name\n- model\n"), "must be a mapping of sections"),
    Case("empty recipe", _text(""), "model: required"),
    Case("misspelled key", _recipe(_rename("finetune.epochs", "epoch")), "finetune.epoch: unknown key"),
    Case("wrong type", _recipe(_set("finetune.batch_size", "many")), "finetune.batch_size"),
    Case("value outside the allowed set", _recipe(_set("finetune.method", "dora")), "finetune.method"),
    Case("negative budget", _recipe(_set("budget.max_accuracy_drop", -0.1)), "budget.max_accuracy_drop"),
    Case("NaN budget", _recipe(_set("budget.max_latency_ms", float("nan"))), "budget.max_latency_ms"),
    Case("duplicate label names", _recipe(_set("data.labels", ["pos", "pos"])), "label names must be unique"),
    Case("missing data file", _recipe(_set("data.train", "sst2/nope.tsv")), "data.train:"),
    Case("missing text column", _recipe(_set("data.text", "sentences")), "no column 'sentences'"),
    Case(
        "label outside the declared labels",
        _recipe(_data_file("bad.tsv", "sentence\tlabel\ngood\t1\nbad\t7\n")),
        "row 2 has 7",
    ),
    Case("empty split", _recipe(_data_file("empty.tsv", "sentence\tlabel\n")), "the split is empty"),
    Case("text column that is not text", _recipe(_data_file("num.tsv", "sentence\tlabel\n3\t1\n")), "must hold text"),
    Case("unsupported data file type", _recipe(_data_file("x.parquet", "PAR1")), "unsupported file type"),
    Case(
        "data path leading out of the data root",
        _recipe(_set("data.eval", "../secrets.tsv")),
        "data.allow_outside_root: true",
    ),
    Case(
        "data file that is a link leading out of the data root", _recipe(_linked_out), "data.allow_outside_root: true"
    ),
    Case("model source that does not exist", _recipe(_set("model.source", "./no/such/model")), "does not exist"),
    Case("unsupported architecture", _recipe(_model_folder(_architecture)), "'whisper' is not a supported encoder"),
    Case(
        "max_length past the model's position embeddings",
        _recipe(_model_folder(_short_positions)),
        "bundle.max_length: 128 tokens, but",
    ),
    Case(
        "strings-in graph with a tokenizer that is not WordPiece",
        _recipe(_model_folder(_bpe_tokenizer), _set("bundle.tokenizer", "in-graph")),
        "Set bundle.tokenizer: beside",
    ),
    Case(
        "labels left out, an eval label the training file lacks",
        _recipe(_drop_labels, _data_file("unseen.tsv", "sentence\tlabel\ngood\t0\nbad\t2\n", "eval")),
        "never appear in the training file",
    ),
    Case("pickle-only checkpoint", _recipe(_model_folder(_pickled)), "model.allow_pickle: true"),
    Case("model folder that ships code", _recipe(_model_folder(_remote_code)), "model.trust_remote_code: true"),
    Case("model path leading out of the project", _recipe(_outside_project), "model.allow_outside_project: true"),
    Case(
        "stage order that cannot work (QAT Q/DQ export without QAT training)",
        _recipe(_set("compile.quantize", ["qat-qdq"])),
        "qat",
    ),
    Case(
        "distillation keeping a layer the model lacks",
        _recipe(_set("compile.distill", {"layers": [0, 9]})),
        "compile.distill.layers: [0, 9]",
    ),
    Case(
        "a validation file with the eval file's rows",
        _recipe(_set("finetune.validation", {"file": "sst2/dev.tsv"})),
        "has the same rows as data.eval",
    ),
    Case(
        "distillation pruning the FFN to the model's own width",
        _recipe(_set("compile.distill", {"num_layers": 1, "intermediate_size": 64})),
        "compile.distill.intermediate_size: 64 keeps every FFN neuron",
    ),
    Case("fp16 training without a GPU", _recipe(_set("finetune.precision", "fp16")), "needs a CUDA GPU"),
    Case("override of an unknown key", _with_override("finetune.lrate=1e-4"), "finetune.lrate: unknown key"),
    Case("override value of the wrong type", _with_override("bench.batch_sizes=[one]"), "bench.batch_sizes"),
    Case("a key set twice", _duplicate_key, "finetune.lr: set twice, on lines"),
    Case(
        "an embedding recipe without the pair's second text",
        _task("embedding", {"train": "stsb/train.tsv", "eval": "stsb/dev.tsv", "text": "sentence1", "label": "score"}),
        "data.text_pair: embedding recipes are measured on scored pairs",
    ),
    Case(
        "a pair score outside 0..score_max",
        _task(
            "embedding",
            {"train": "p.tsv", "eval": "p.tsv", "text": "a", "text_pair": "b", "label": "s"},
            {"p.tsv": "a\tb\ts\nx\ty\t3.5\nx\tz\t9\n"},
        ),
        "row 2 has 9.0, not a score in 0..5",
    ),
    Case(
        "a tagged row whose words and tags differ in length",
        _task(
            "tagging", _TAGGED, {"train.jsonl": _WORDS, "dev.jsonl": _WORDS + '{"tokens": ["a", "b"], "tags": ["O"]}\n'}
        ),
        "row 2 has 2 words in 'tokens' but 1 tags in 'tags'",
    ),
    Case(
        "a tag outside the training file's tag set",
        _task("tagging", _TAGGED, {"train.jsonl": _WORDS, "dev.jsonl": '{"tokens": ["Rome"], "tags": ["B-city"]}\n'}),
        "row 1 has tag 'B-city', which is not in the tag set",
    ),
    Case("a recipe copied to a new file, its name left as it was", _copied_under_another_name, "differs from"),
]


def _run(case: Case, tmp: Path, model: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    args = case.make(tmp, model)
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def _normalise(message: str, tmp: Path, model: Path) -> str:
    """The message with this machine's paths replaced by names, so that the README table is the same everywhere."""
    data = resolve_data_root(None)
    for root in sorted(
        {str(data), str(data.resolve())}, key=len, reverse=True
    ):  # the root as written, and behind links
        message = message.replace(root, "<data>")
    return (
        message.replace(os.path.relpath(model, PROJECT_ROOT), "<relative path to the model>")
        .replace(str(data.resolve().parent), "<data>/..")
        .replace(str(tmp.resolve()), "<tmp>")
        .replace(str(tmp), "<tmp>")
        .replace(str(model.resolve()), "<model>")
        .replace(str(PROJECT_ROOT.resolve()), "<project>")
    )


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gets_exit_2_and_a_message_without_traceback(
    case: Case, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    if case.what.startswith("fp16") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = _run(case, tmp_path, tiny_model, capsys)
    assert code == 2, err
    assert case.expect in err, err
    assert "Traceback" not in err
    assert "error: " in err


def _readme_table(rows: list[tuple[str, str]]) -> str:
    lines = ["| bad input | what the CLI says (exit code 2, before any compute) |", "| --- | --- |"]
    for what, message in rows:
        lines.append(f"| {what} | {message.replace('|', '/')} |")
    return "\n".join(lines)


def test_readme_lists_every_bad_input_with_its_message(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    import torch

    rows = []
    for case in CASES:
        if case.what.startswith("fp16") and torch.cuda.is_available():
            continue
        tmp = tmp_path_factory.mktemp("bad")
        _, err = _run(case, tmp, tiny_model, capsys)
        body = err.removeprefix("error: ").strip()
        problem = next((line.strip()[2:] for line in body.splitlines() if line.strip().startswith("- ")), body)
        rows.append((case.what, _normalise(problem, tmp, tiny_model)))
    assert len(rows) >= 15
    table = _readme_table(rows)
    readme = PROJECT_ROOT / "docs" / "reliability.md"
    text = readme.read_text()
    start, end = "<!-- bad-inputs:start -->\n", "\n<!-- bad-inputs:end -->"
    current = text.split(start, 1)[1].split(end, 1)[0] if start in text else None
    if os.environ.get("TOOLCHAIN_UPDATE_README") == "1":
        assert current is not None, "docs/reliability.md has no <!-- bad-inputs:start --> marker"
        readme.write_text(text.replace(start + current + end, start + table + end))
        return
    assert current == table, "README's bad-input table is stale: rerun with TOOLCHAIN_UPDATE_README=1"
