"""The engine knows no task: a toy task defined only here (a majority-class "model") registers itself with its two
stages and runs through `engine.run` to a bundle, a report and a lineage, reused on the second run, with no edit
under toolchain/."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_recipe_dict, write_recipe

from toolchain import engine
from toolchain.core import registry
from toolchain.core import task as task_module
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import RunContext
from toolchain.core.manifest import file_table, write_manifest
from toolchain.core.task import Choice, Variant, register_task
from toolchain.recipe.load import load_recipe
from toolchain.recipe.schema import Recipe


def count_labels(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    counts = Counter(int(y) for y in ctx.train.labels)
    majority = counts.most_common(1)[0][0]
    (out / "model.json").write_text(json.dumps({"label": call.config["labels"][majority]}))
    return {"counts": dict(counts)}


def toy_bundle(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    (out / "model.json").write_bytes(inputs["count"].file("model.json").read_bytes())
    write_manifest(out, {"kind": "toy", "variant": call.config["shipped"], "files": file_table(out)})
    return {}


class Majority:
    name = "toy-majority"
    distributed_stage = None

    def matches(self, recipe: Recipe) -> bool:
        return recipe.name.startswith("toy-")

    def expect_resources(self, ctx: RunContext) -> dict[str, Any]:
        return {}

    def plan(self, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
        labels = ctx.recipe.data.labels
        call = StageCall("count", "toy-count", {"labels": labels}, (), {"train_sha256": ctx.train.sha256})
        return [call], [Variant("majority", "count", "json", "none")]

    def rows(self, ctx: RunContext, variants: list[Variant]) -> list[dict[str, Any]]:
        label = json.loads(ctx.artifacts["count"].file("model.json").read_text())["label"]
        index = ctx.recipe.data.labels.index(label)
        return [{"name": "majority", "accuracy": float((ctx.eval.labels == index).mean())}]

    def choose(self, rows: list[dict[str, Any]], recipe: Recipe) -> Choice:
        return Choice("majority", "accuracy", {"majority": "shipped: the only one"}, rows)

    def explain(self, choice: Choice) -> str:
        return str(choice.verdicts)

    def bundle_call(self, ctx: RunContext, variants: list[Variant], choice: Choice) -> StageCall:
        return StageCall("bundle", "toy-bundle", {"shipped": choice.shipped}, ("count",))

    def write_report(self, ctx: RunContext, rows: list[dict[str, Any]], choice: Choice, bundle: Path | None) -> Path:
        path = ctx.run_dir / "report.json"
        path.write_text(json.dumps({"kind": "toy", "variants": rows, "shipped": choice.shipped}))
        return path


@pytest.fixture
def toy_task(monkeypatch: pytest.MonkeyPatch) -> None:
    engine.load_all()  # the real tasks first; the toy is registered after them, so it wins for its recipes
    monkeypatch.setattr(task_module, "TASKS", list(task_module.TASKS))
    for name, fn, kind in (("toy-count", count_labels, "json"), ("toy-bundle", toy_bundle, "bundle")):
        monkeypatch.setitem(registry.STAGES, name, registry.Stage(name, kind, fn, "a toy stage", 1))
    register_task(Majority())


def test_a_task_defined_outside_the_toolchain_runs_through_the_engine(
    toy_task: None, tiny_model: Path, tmp_path: Path
) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_dict(tiny_model, name="toy-majority")))
    ctx = engine.run(recipe, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "toy-majority"
    assert [r.key for r in ctx.records] == ["count", "bundle"]
    assert json.loads((run_dir / "bundle" / "model.json").read_text())["label"] in recipe.data.labels
    report = json.loads((run_dir / "report.json").read_text())
    assert report["shipped"] == "majority" and 0.3 < report["variants"][0]["accuracy"] < 0.7  # SST-2 is balanced
    assert [s["key"] for s in json.loads((run_dir / "lineage.json").read_text())["stages"]] == ["count", "bundle"]
    again = engine.run(recipe, tmp_path / "runs")
    assert [r.status for r in again.records] == ["reused", "reused"]


def test_a_recipe_goes_to_the_last_task_that_matches_it(toy_task: None, tiny_model: Path, tmp_path: Path) -> None:
    toy = load_recipe(write_recipe(tmp_path, tiny_recipe_dict(tiny_model, name="toy-majority")))
    plain = load_recipe(write_recipe(tmp_path, tiny_recipe_dict(tiny_model)))
    assert task_module.task_for(toy).name == "toy-majority"
    assert task_module.task_for(plain).name == "classification"


def test_a_stage_reads_only_the_splits_its_id_covers(tiny_model: Path, tmp_path: Path) -> None:
    from toolchain.core.context import StageContext
    from toolchain.core.registry import StageConfig

    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_dict(tiny_model)))
    run = RunContext(recipe, tmp_path / "runs")
    call = StageCall("count", "toy-count", {}, (), {"train_sha256": run.train.sha256})
    ctx = StageContext(run, call, StageConfig())
    assert len(ctx.train) == len(run.train)
    with pytest.raises(RuntimeError, match="eval_sha256"):
        _ = ctx.eval
    with pytest.raises(RuntimeError, match="validation_sha256"):
        _ = ctx.validation


def test_a_plan_whose_config_its_stage_cannot_read_fails_before_any_stage_runs() -> None:
    from toolchain.core.registry import typed_config
    from toolchain.errors import ToolchainError

    engine.load_all()
    with pytest.raises(ToolchainError, match="max_length"):  # export reads max_length; the call lacks it
        typed_config(StageCall("export", "export", {"opset": 17}))
    with pytest.raises(ToolchainError, match="would not be in its id"):  # only the named settings escape the id
        typed_config(StageCall("evaluate.x", "evaluate", {}, settings={"batch_size": 8}))
    config = typed_config(StageCall("export", "export", {"opset": 17, "max_length": 64}))
    assert config.model_dump()["max_length"] == 64
