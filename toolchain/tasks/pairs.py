"""Sentence pairs: a cross-encoder reads (text, text_pair) together, as a classifier over labels or a regressor of a
score; fine-tuned, exported, fused, quantized, measured on the eval pairs (the choice) and the test pairs, timed on
the eval pairs in fresh processes; the fastest variant within the budget ships, with a CrossEncoder runtime."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

# the stages this task plans: importing them registers them
import toolchain.stages.bench
import toolchain.stages.export
import toolchain.stages.optimize
import toolchain.stages.pair_bundle
import toolchain.stages.pair_evaluate
import toolchain.stages.pair_finetune
import toolchain.stages.quantize  # noqa: F401
from toolchain import resources
from toolchain.choose import BASELINE, choice_table, choose_variant
from toolchain.core.artifact import StageCall
from toolchain.core.context import RunContext
from toolchain.core.task import Choice, Variant, register_task
from toolchain.models import source_identity
from toolchain.recipe.schema import PairsSection, Recipe
from toolchain.report import pairs as report
from toolchain.report.rows import PairRow, measured_fields
from toolchain.stages.optimize import no_fusions_for

log = logging.getLogger("toolchain")

SPEARMAN_RESOLUTION = 0.001  # as the embedding task's: a tenth of a Spearman point is noise on 1,500 pairs


def settings(recipe: Recipe) -> PairsSection:
    return recipe.pairs or PairsSection.model_validate({})


# long: the task's whole plan, stage by stage in run order, each id's inputs beside it
def plan(ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
    """The stage calls of a pair recipe, in order, and the variants they produce."""
    recipe = ctx.recipe
    d, ft, comp = recipe.data, recipe.finetune, recipe.compile
    pairs = settings(recipe)
    evl, test = ctx.eval, ctx.test
    columns: dict[str, Any] = {"text": d.text, "text_pair": d.text_pair, "label": d.label, "labels": d.labels}
    eval_identity = {**columns, "eval_sha256": evl.sha256, "eval_rows": len(evl)}
    calls = [
        StageCall(
            "finetune",
            "pair-finetune",
            {**ctx.training_config(ft), "pairs": pairs.model_dump(mode="json")},
            identity={
                "model": source_identity(recipe.model.source, recipe.model),
                **columns,
                "train_sha256": ctx.train.sha256,
                "max_train_rows": d.max_train_rows,
            },
            settings={"checkpoint_every": ft.checkpoint_every, "access": recipe.model.model_dump(mode="json")},
        ),
        StageCall(
            "export",
            "export",
            {**comp.export.model_dump(mode="json"), "max_length": recipe.bundle.max_length},
            ("finetune",),
            eval_identity,
        ),
    ]
    variants = [Variant(BASELINE, "finetune", "pytorch", "fp32"), Variant("onnx-fp32", "export", "onnx", "fp32")]
    fp32 = "export"
    unfused = no_fusions_for(recipe)
    if unfused:
        log.info("optimize: skipped, %s", unfused.removeprefix("none: "))
    elif comp.optimize:
        calls.append(
            StageCall("optimize", "optimize", {"atol": comp.export.atol}, ("export", "finetune"), eval_identity)
        )
        variants.append(Variant("onnx-fp32-optimized", "optimize", "onnx", "fp32"))
        fp32 = "optimize"
    for q in comp.quantize:
        identity = {
            **eval_identity,
            "export": comp.export.model_dump(mode="json"),
            "max_length": recipe.bundle.max_length,
            "seed": ft.seed,
        }
        key = f"quantize.{q.variant_name}"
        calls.append(StageCall(key, "quantize", q.stage_config(), (fp32, "export", "finetune"), identity))
        variants.append(Variant(q.variant_name, key, "onnx", q.precision))
    measured = eval_identity | {
        "test_sha256": test.sha256 if test is not None else None,
        "test_rows": len(test) if test is not None else 0,
    }
    for v in variants:
        cfg = {
            "variant": v.name,
            "format": v.format,
            "max_length": recipe.bundle.max_length,
            "batch_size": recipe.evaluate.batch_size,
            "objective": pairs.objective,
        }
        inputs = tuple(dict.fromkeys([v.source, "finetune"]))
        calls.append(StageCall(f"evaluate.{v.name}", "pair-evaluate", cfg, inputs, measured))
    bench_cfg = {
        **recipe.bench.model_dump(mode="json"),
        "threads": ctx.threads,
        "max_length": recipe.bundle.max_length,
        "variants": [v.__dict__ for v in variants],
        "pairs": True,
    }
    sources = tuple(dict.fromkeys([v.source for v in variants] + ["finetune"]))
    calls.append(StageCall("bench", "bench", bench_cfg, sources, eval_identity))
    return calls, variants


def variant_rows(ctx: RunContext, variants: list[Variant]) -> list[PairRow]:
    """One row per variant: the metric on the eval pairs (the choice's) and on the test pairs, size and latency as
    for classifiers."""
    regression = settings(ctx.recipe).objective == "regression"
    key = "spearman" if regression else "accuracy"
    scale = 100 if regression else 1  # Spearman is kept x 100, accuracy as a fraction
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    metrics = {
        v.name: json.loads(ctx.artifacts[f"evaluate.{v.name}"].file("metrics.json").read_text()) for v in variants
    }
    base = metrics[BASELINE]
    base_cases = bench["variants"][BASELINE]["cases"]
    rows = []
    for v in variants:
        m, b, meta = metrics[v.name], bench["variants"][v.name], ctx.artifacts[v.source].meta
        splits = [s for s in ("eval", "test") if s in m]
        measures = ("spearman", "pearson") if regression else ("accuracy",)
        row = cast(
            PairRow,
            {
                "name": v.name,
                "format": v.format,
                "precision": v.precision,
                "metric": key,
                "objective": "regression" if regression else "classification",
                "accuracy": m["eval"][key] / scale,
                "correct": None if regression else m["eval"]["correct"],
                "eval_rows": m["eval"]["pairs"],
                "accuracy_drop": (base["eval"][key] - m["eval"][key]) / scale,
                "by_split": {s: {k: m[s][k] for k in measures} for s in splits},
                **measured_fields(b, base_cases, meta, ctx.artifacts[v.source].id),
            },
        )
        rows.append(row)
    return rows


class Pairs:
    name = "pairs"
    distributed_stage: str | None = None

    def matches(self, recipe: Recipe) -> bool:
        return recipe.is_pair

    def expect_resources(self, ctx: RunContext) -> dict[str, Any]:
        return resources.expect(ctx.recipe, ctx.run_dir)

    def plan(self, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
        return plan(ctx)

    def rows(self, ctx: RunContext, variants: list[Variant]) -> list[PairRow]:
        return variant_rows(ctx, variants)

    def choose(self, rows: list[PairRow], recipe: Recipe) -> Choice[PairRow]:
        if settings(recipe).objective == "regression":
            return choose_variant(rows, recipe.budget, metric="Spearman", resolution=SPEARMAN_RESOLUTION)
        return choose_variant(rows, recipe.budget)

    def explain(self, choice: Choice[PairRow]) -> str:
        return choice_table(choice)  # type: ignore[arg-type]

    def bundle_call(self, ctx: RunContext, variants: list[Variant], choice: Choice[PairRow]) -> StageCall:
        recipe = ctx.recipe
        pairs = settings(recipe)
        variant = next(v for v in variants if v.name == choice.shipped)
        return StageCall(
            "bundle",
            "pair-bundle",
            {
                "shipped": choice.shipped,
                "name": recipe.name,
                "objective": pairs.objective,
                "labels": recipe.data.labels,
                "score_max": pairs.score_max,
                "eval_file": recipe.data.eval,
                "test_file": recipe.data.test,
                "max_length": recipe.bundle.max_length,
                "batch_size": recipe.evaluate.batch_size,
                "ort_format": recipe.bundle.ort_format,
                "budget": recipe.budget.model_dump(mode="json"),
            },
            tuple(dict.fromkeys(["finetune", variant.source, f"evaluate.{variant.name}", "bench"])),
            {
                "recipe": recipe.model_dump(mode="json"),
                "eval_sha256": ctx.eval.sha256,
                "base_model": source_identity(recipe.model.source, recipe.model),
            },
        )

    def write_report(self, ctx: RunContext, rows: list[PairRow], choice: Choice[PairRow], bundle: Path | None) -> Path:
        return report.write(ctx, rows, choice, bundle)


register_task(Pairs())
