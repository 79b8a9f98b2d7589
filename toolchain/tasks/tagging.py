"""Token classification: an encoder with a token-classification head fine-tuned on tagged words (each word's tag at
its first sub-token), exported, fused, quantized, measured by entity-level F1 on the eval and test sentences, timed
in fresh processes; the fastest variant within the budget ships, with a Tagger that finds entities in raw text."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

# the stages this task plans: importing them registers them
import toolchain.stages.bench
import toolchain.stages.optimize
import toolchain.stages.quantize
import toolchain.stages.tag_bundle
import toolchain.stages.tag_evaluate
import toolchain.stages.tag_export
import toolchain.stages.tag_finetune  # noqa: F401
from toolchain import resources
from toolchain.choose import BASELINE, choice_table, choose_variant
from toolchain.core.artifact import StageCall
from toolchain.core.context import RunContext
from toolchain.core.task import Choice, Variant, register_task
from toolchain.models import source_identity
from toolchain.recipe.schema import Recipe
from toolchain.report import tagging as report
from toolchain.report.rows import TaggerRow, measured_fields
from toolchain.stages.optimize import no_fusions_for
from toolchain.tag.metrics import entity_changes

log = logging.getLogger("toolchain")

# F1 differences below a tenth of a point are noise (WNUT-17 dev: 836 entities): within it, variants whose latency
# ranges overlap are as accurate and the smaller ships
F1_RESOLUTION = 0.001


# long: the task's whole plan, stage by stage in run order, each id's inputs beside it
def plan(ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
    """The stage calls of a tagging recipe, in order, and the variants they produce."""
    recipe = ctx.recipe
    d, ft, comp = recipe.data, recipe.finetune, recipe.compile
    evl, test = ctx.eval, ctx.test
    columns: dict[str, Any] = {"text": d.text, "label": d.label, "labels": d.labels}
    eval_identity = {**columns, "eval_sha256": evl.sha256, "eval_rows": len(evl)}
    calls = [
        StageCall(
            "finetune",
            "tag-finetune",
            ctx.training_config(ft),
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
            "tag-export",
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
        }
        inputs = tuple(dict.fromkeys([v.source, "finetune"]))
        calls.append(StageCall(f"evaluate.{v.name}", "tag-evaluate", cfg, inputs, measured))
    bench_cfg = {
        **recipe.bench.model_dump(mode="json"),
        "threads": ctx.threads,
        "max_length": recipe.bundle.max_length,
        "variants": [v.__dict__ for v in variants],
    }
    sources = tuple(dict.fromkeys([v.source for v in variants] + ["finetune"]))
    calls.append(StageCall("bench", "bench", bench_cfg, sources, eval_identity))
    return calls, variants


def variant_rows(ctx: RunContext, variants: list[Variant]) -> list[TaggerRow]:
    """One row per variant: entity F1 on the eval sentences (the choice's metric) and the test sentences, per type,
    size and latency as for classifiers, and the test entities lost and gained against fp32 PyTorch."""
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    metrics = {
        v.name: json.loads(ctx.artifacts[f"evaluate.{v.name}"].file("metrics.json").read_text()) for v in variants
    }
    base = metrics[BASELINE]
    base_cases = bench["variants"][BASELINE]["cases"]
    tags = ctx.recipe.data.labels
    split = "test" if "test" in base else "eval"
    words = (ctx.test if split == "test" and ctx.test is not None else ctx.eval).words or []
    rows = []
    for v in variants:
        m, b, meta = metrics[v.name], bench["variants"][v.name], ctx.artifacts[v.source].meta
        splits = [s for s in ("eval", "test") if s in m]
        row = cast(
            TaggerRow,
            {
                "name": v.name,
                "format": v.format,
                "precision": v.precision,
                "metric": "entity_f1",
                "accuracy": m["eval"]["f1"] / 100,
                "correct": None,
                "eval_rows": m["eval"]["sentences"],
                "accuracy_drop": (base["eval"]["f1"] - m["eval"]["f1"]) / 100,
                "f1": {s: m[s]["f1"] for s in splits},
                "entity_precision": {s: m[s]["precision"] for s in splits},
                "entity_recall": {s: m[s]["recall"] for s in splits},
                "per_type": {s: m[s]["per_type"] for s in splits},
                **measured_fields(b, base_cases, meta, ctx.artifacts[v.source].id),
            },
        )
        if v.name != BASELINE:
            names = [[[tags[t] for t in ts] for ts in x[split]["predicted"]] for x in (base, m)]
            row["entity_changes"] = {"split": split, **entity_changes(words, names[0], names[1])}
        rows.append(row)
    return rows


class Tagging:
    name = "tagging"
    distributed_stage: str | None = None

    def matches(self, recipe: Recipe) -> bool:
        return recipe.tagging is not None

    def expect_resources(self, ctx: RunContext) -> dict[str, Any]:
        return resources.expect(ctx.recipe, ctx.run_dir)

    def plan(self, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
        return plan(ctx)

    def rows(self, ctx: RunContext, variants: list[Variant]) -> list[TaggerRow]:
        return variant_rows(ctx, variants)

    def choose(self, rows: list[TaggerRow], recipe: Recipe) -> Choice[TaggerRow]:
        return choose_variant(rows, recipe.budget, metric="entity F1", resolution=F1_RESOLUTION)

    def explain(self, choice: Choice[TaggerRow]) -> str:
        return choice_table(choice)  # type: ignore[arg-type]

    def bundle_call(self, ctx: RunContext, variants: list[Variant], choice: Choice[TaggerRow]) -> StageCall:
        recipe = ctx.recipe
        variant = next(v for v in variants if v.name == choice.shipped)
        return StageCall(
            "bundle",
            "tag-bundle",
            {
                "shipped": choice.shipped,
                "name": recipe.name,
                "labels": recipe.data.labels,
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

    def write_report(
        self, ctx: RunContext, rows: list[TaggerRow], choice: Choice[TaggerRow], bundle: Path | None
    ) -> Path:
        return report.write(ctx, rows, choice, bundle)


register_task(Tagging())
