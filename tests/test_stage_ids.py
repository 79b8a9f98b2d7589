"""Stage ids are the cache's contract: a refactor that changes one silently retrains or re-measures a user's runs.
The golden file holds the id of every stage every recipe plans (recipes/ and bench/), with the library versions,
threads and CPU preset it was computed under; the test recomputes them under those recorded values, so a new wheel
or another machine does not fail it, and a change to what a stage hashes does.

Regenerate on purpose (and say why in the commit): `.venv/bin/python tests/test_stage_ids.py --write` (under the
recorded values; `--write --here`: under this machine's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from toolchain.core.artifact import StageCall
from toolchain.core.context import RunContext
from toolchain.engine import load_all, planned_ids
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe
from toolchain.recipe.schema import Recipe

GOLDEN = Path(__file__).parent / "golden" / "stage_ids.json"
RECIPES = sorted([*PROJECT_ROOT.glob("recipes/*.yaml"), *PROJECT_ROOT.glob("bench/*.yaml")])


def ids_of(path: Path, under: dict[str, Any] | None = None) -> dict[str, str]:
    recipe = load_recipe(path, [])
    under = under or {}
    ctx = RunContext(
        recipe,
        versions=under.get("versions"),
        threads=under.get("threads"),
        cpu_preset=under.get("cpu_preset"),
        bf16_native=under.get("bf16_native"),
    )
    return {call.key: sid for call, sid in planned_ids(ctx)}


def _name(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def test_every_recipe_is_in_the_golden_file() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden["recipes"]) == [_name(p) for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_stage_ids_are_those_recorded(path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert ids_of(path, golden["computed_under"]) == golden["recipes"][_name(path)]


def test_an_id_follows_what_its_stage_is_given() -> None:
    """The check can fail: another learning rate changes finetune's id and every id after it."""
    path = PROJECT_ROOT / "recipes" / "sst2-minilm.yaml"
    golden = json.loads(GOLDEN.read_text())
    recipe = load_recipe(path, ["finetune.lr=3e-5"])
    under = golden["computed_under"]
    ctx = RunContext(recipe, **under)
    changed = {call.key for call, sid in planned_ids(ctx) if sid != golden["recipes"][_name(path)][call.key]}
    assert changed == set(golden["recipes"][_name(path)])


def write(here: bool) -> None:
    """Every recipe's ids, under the recorded values (a new recipe is added, the others stay as they were), or with
    `here` under this machine's versions, threads, CPU preset and bf16 support."""
    load_all()
    if here or not GOLDEN.exists():
        first = RunContext(load_recipe(PROJECT_ROOT / "recipes" / "sst2-minilm.yaml", []))
        under = {
            "versions": first.versions,
            "threads": first.threads,
            "cpu_preset": first.cpu_preset,
            "bf16_native": first.bf16_native,
        }
    else:
        under = json.loads(GOLDEN.read_text())["computed_under"]
    data = {"computed_under": under, "recipes": {_name(p): ids_of(p, under) for p in RECIPES}}
    GOLDEN.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{GOLDEN}: {sum(len(v) for v in data['recipes'].values())} ids of {len(RECIPES)} recipes")


if __name__ == "__main__":
    if sys.argv[1:] not in (["--write"], ["--write", "--here"]):
        sys.exit(__doc__)
    write(here=sys.argv[2:] == ["--here"])


def test_the_export_id_covers_the_length_its_parity_reference_is_computed_at() -> None:
    """export computes its PyTorch reference at bundle.max_length: another length is another export (and what
    follows), never a stale reference; the fine-tuned model is kept."""
    path = PROJECT_ROOT / "recipes" / "sst2-minilm.yaml"
    golden = json.loads(GOLDEN.read_text())
    under = golden["computed_under"]
    recipe = load_recipe(path, ["bundle.max_length=64"])
    ctx = RunContext(recipe, **under)
    ids = {call.key: sid for call, sid in planned_ids(ctx)}
    recorded = golden["recipes"][_name(path)]
    assert ids["export"] != recorded["export"] and ids["finetune"] == recorded["finetune"]


# The stages whose output is trained (or feeds training): the rows accuracy is reported on must not reach them.
TRAINING_STAGES = {"finetune", "teacher-logits", "distill", "llm-finetune"}


def eval_rows_in_training(path: Path, overrides: list[str] | None = None) -> list[str]:
    """The training or distillation calls of a recipe's plan whose id holds the eval file's sha256."""
    ctx = RunContext(load_recipe(path, overrides or []))
    sha = ctx.eval.sha256
    return [
        call.key for call, _ in planned_ids(ctx) if call.stage in TRAINING_STAGES and sha in json.dumps(call.__dict__)
    ]


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_no_training_or_distillation_identity_holds_the_eval_rows(path: Path) -> None:
    """What trains, distils or selects a model never sees the rows its accuracy is reported on (dev.tsv)."""
    from toolchain.core.registry import STAGES

    assert eval_rows_in_training(path) == []
    assert set(STAGES) >= TRAINING_STAGES  # (registered once a plan imported the tasks)


def test_the_eval_rows_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the recipe check that refuses it switched off, validating on dev.tsv shows in both training ids."""
    monkeypatch.setattr("toolchain.recipe.load.check_data", lambda recipe: [])
    path = PROJECT_ROOT / "recipes" / "sst2-minilm.yaml"
    assert eval_rows_in_training(path, ["finetune.validation={file: sst2/dev.tsv}"]) == ["finetune", "distill"]


def test_precision_auto_is_resolved_for_the_machine_and_the_id_holds_what_it_resolved_to() -> None:
    """auto trains in bf16 where the hardware has it and in fp32 elsewhere; explicit values stay as written."""
    golden = json.loads(GOLDEN.read_text())
    under = golden["computed_under"]
    path = PROJECT_ROOT / "recipes" / "sst2-minilm.yaml"
    recipe = load_recipe(path, [])
    assert recipe.finetune.precision == "auto" and recipe.compile.distill is not None

    def planned(r: Recipe, native: bool) -> dict[str, StageCall]:
        ctx = RunContext(r, **(under | {"bf16_native": native}))
        return {call.key: call for call, _ in planned_ids(ctx)}

    native, emulated = planned(recipe, True), planned(recipe, False)
    assert native["finetune"].config["precision"] == native["distill"].config["precision"] == "bf16"
    assert emulated["finetune"].config["precision"] == emulated["distill"].config["precision"] == "fp32"
    assert ids_of(path, under | {"bf16_native": False})["finetune"] != golden["recipes"][_name(path)]["finetune"]
    fp32 = load_recipe(path, ["finetune.precision=fp32", "compile.distill.precision=fp32"])
    assert ids_of(path, under | {"bf16_native": False}) == {
        call.key: sid for call, sid in planned_ids(RunContext(fp32, **(under | {"bf16_native": True})))
    }
    explicit = load_recipe(path, ["finetune.precision=bf16"])
    assert planned(explicit, False)["finetune"].config["precision"] == "bf16"
