"""`python -m toolchain new`: a recipe from a data file, valid as written, never over an existing one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolchain.cli import main
from toolchain.recipe.load import load_recipe


def test_a_csv_with_awkward_label_names_gives_a_valid_recipe(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = ["what is my balance?", "card: blocked", "#hashtag help", "what is my balance?"]
    labels = ["balance?", "card: blocked", "#help", "balance?"]
    lines = ["id,utterance,category"] + [
        f'{i},"{t} {i}",{json_quote(lab)}' for i, (t, lab) in enumerate(zip(rows * 10, labels * 10, strict=True))
    ]
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    (data / "test.csv").write_text("\n".join(lines[:9]) + "\n")
    recipes = tmp_path / "recipes"
    args = ["new", "intents", "--train", str(data / "train.csv"), "--eval", str(data / "test.csv")]
    assert main([*args, "--recipes", str(recipes)]) == 0
    path = recipes / "intents.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["data"]["text"] == "utterance" and raw["data"]["label"] == "category"  # detected
    assert raw["data"]["labels"] == ["balance?", "card: blocked", "#help"]  # first appearance, quoted in the file
    assert raw["data"]["root"] == str(data) and raw["data"]["train"] == "train.csv"
    assert raw["finetune"]["epochs"] == 3 and raw["finetune"]["max_length"] == 32  # 40 short rows
    recipe = load_recipe(path)
    assert recipe.name == "intents" and recipe.data.labels == raw["data"]["labels"]
    # never over an existing recipe
    before = path.read_text()
    assert main([*args, "--recipes", str(recipes)]) == 1
    assert "exists" in capsys.readouterr().err and path.read_text() == before


def json_quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"') else text


def test_the_agnews_files_give_a_recipe_sized_to_them(tmp_path: Path) -> None:
    from toolchain.scaffold import new_recipe

    path = new_recipe("agnews-new", "agnews/train.tsv", "agnews/test.tsv", folder=tmp_path)
    recipe = load_recipe(path)
    assert recipe.data.train == "agnews/train.tsv" and recipe.data.text == "text" and recipe.data.label == "label"
    assert sorted(recipe.data.labels) == ["Business", "Sci/Tech", "Sports", "World"]
    assert recipe.finetune.epochs == 1 and 64 <= recipe.finetune.max_length <= 128
    assert "10,001 training rows, 7,600 eval rows, 4 classes" in path.read_text()


def test_columns_that_are_not_there_are_named(tmp_path: Path) -> None:
    from toolchain.errors import ToolchainError
    from toolchain.scaffold import new_recipe

    with pytest.raises(ToolchainError, match=r"no column 'words' \(--text\); the file has: text, label"):
        new_recipe("x", "agnews/train.tsv", "agnews/test.tsv", text="words", folder=tmp_path)
    with pytest.raises(ToolchainError, match=r"nope\.tsv: no such file"):
        new_recipe("x", "agnews/nope.tsv", "agnews/test.tsv", folder=tmp_path)
    with pytest.raises(ToolchainError, match=r"recipe name '\.\./x': use letters, digits"):
        new_recipe("../x", "agnews/train.tsv", "agnews/test.tsv", folder=tmp_path / "recipes")
    assert list(tmp_path.iterdir()) == []
