"""Sentence embeddings: an encoder whose token states are mean-pooled and normalized inside the graph, fine-tuned on
scored pairs (or compressed as it is), exported, fused, quantized, measured by Spearman on the eval and test pairs
and by its fidelity to the fp32 embedder, timed in fresh processes; the fastest variant within the budget ships."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import numpy as np

# the stages this task plans: importing them registers them
import toolchain.stages.bench
import toolchain.stages.embed_bundle
import toolchain.stages.embed_distill
import toolchain.stages.embed_evaluate
import toolchain.stages.embed_export
import toolchain.stages.embed_finetune
import toolchain.stages.optimize
import toolchain.stages.quantize  # noqa: F401
from toolchain import resources
from toolchain.choose import BASELINE, choice_table, choose_variant
from toolchain.core.artifact import StageCall
from toolchain.core.context import RunContext
from toolchain.core.task import Choice, Variant, register_task
from toolchain.embed.metrics import moved_pairs
from toolchain.models import source_identity
from toolchain.recipe.schema import Recipe
from toolchain.report import embedding as report
from toolchain.report.rows import EmbedderRow, measured_fields
from toolchain.runtime import sha256_file
from toolchain.stages.optimize import no_fusions_for

log = logging.getLogger("toolchain")

# Spearman differences below a tenth of a point are noise (1,500 STS-B dev pairs: its standard error is about 0.5):
# within it, variants whose latency ranges overlap are as accurate and the smaller ships
SPEARMAN_RESOLUTION = 0.001
UNTUNED = "onnx-fp32-untuned"  # the pretrained embedder exported as it is: checks the pooling against published scores
STUDENT = "pytorch-fp32-student"  # the distilled student in PyTorch (compile.distill)


# long: the task's whole plan, stage by stage in run order, each id's inputs beside it
def plan(ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
    """The stage calls of an embedding recipe, in order, and the variants they produce."""
    recipe = ctx.recipe
    d, ft, comp, emb = recipe.data, recipe.finetune, recipe.compile, recipe.embedding
    assert emb is not None
    evl, test = ctx.eval, ctx.test
    columns: dict[str, Any] = {"text": d.text, "text_pair": d.text_pair, "label": d.label, "labels": []}
    eval_identity = {**columns, "eval_sha256": evl.sha256, "eval_rows": len(evl)}
    model = {
        "model": source_identity(recipe.model.source, recipe.model),
        **columns,
        "max_train_rows": d.max_train_rows,
    }
    settings = {"checkpoint_every": ft.checkpoint_every, "access": recipe.model.model_dump(mode="json")}
    finetune_cfg = {**ctx.training_config(ft), "embedding": emb.model_dump(mode="json")}
    trains = ft.method != "none"
    calls = [
        StageCall(
            "finetune",
            "embed-finetune",
            finetune_cfg,
            identity=model | ({"train_sha256": ctx.train.sha256} if trains else {}),
            settings=settings,
        )
    ]
    variants = [Variant(BASELINE, "finetune", "pytorch", "fp32")]
    export_cfg = {**comp.export.model_dump(mode="json"), "max_length": recipe.bundle.max_length}
    compiled = {**eval_identity, "export": comp.export.model_dump(mode="json"), "max_length": recipe.bundle.max_length}
    unfused = no_fusions_for(recipe)
    if unfused:
        log.info("optimize: skipped, %s", unfused.removeprefix("none: "))

    def compile_branch(model_key: str, suffix: str) -> None:
        """Export, fuse and quantize one embedder: the fine-tuned one (suffix "") or the student ("-student")."""
        tag = suffix.replace("-", ".")  # stage keys: export, export.student, ...
        export = f"export{tag}"
        calls.append(StageCall(export, "embed-export", export_cfg, (model_key,), eval_identity))
        variants.append(Variant(f"onnx-fp32{suffix}", export, "onnx", "fp32"))
        fp32 = export
        if comp.optimize and not unfused:
            fp32 = f"optimize{tag}"
            calls.append(StageCall(fp32, "optimize", {"atol": comp.export.atol}, (export, model_key), eval_identity))
            variants.append(Variant(f"onnx-fp32-optimized{suffix}", fp32, "onnx", "fp32"))
        for q in comp.quantize:
            key = f"quantize.{q.variant_name}{tag}"
            inputs = (fp32, export, "finetune")  # the graph, its PyTorch reference, the tokenizer
            calls.append(StageCall(key, "quantize", q.stage_config(), inputs, compiled | {"seed": ft.seed}))
            variants.append(Variant(f"{q.variant_name}{suffix}", key, "onnx", q.precision))

    compile_branch("finetune", "")
    if trains:  # the pretrained embedder, exported with its pooling: the published score checks the graph
        calls.append(StageCall("pretrained", "embed-finetune", finetune_cfg | {"method": "none"}, (), model, settings))
        calls.append(StageCall("export.untuned", "embed-export", export_cfg, ("pretrained",), eval_identity))
        variants.insert(2, Variant(UNTUNED, "export.untuned", "onnx", "fp32"))  # beside the fine-tuned export
    if comp.distill is not None:  # a student beside the fine-tuned embedder: both compiled, both candidates
        train_identity = {**columns, "train_sha256": ctx.train.sha256, "max_train_rows": d.max_train_rows}
        distill_cfg = ctx.training_config(comp.distill)
        calls.append(StageCall("distill", "embed-distill", distill_cfg, ("finetune",), train_identity))
        variants.append(Variant(STUDENT, "distill", "pytorch", "fp32"))
        compile_branch("distill", "-student")
    corpus_sha = sha256_file(recipe.data_root() / emb.corpus) if emb.corpus else None
    measured = eval_identity | {
        "test_sha256": test.sha256 if test is not None else None,
        "test_rows": len(test) if test is not None else 0,
        "corpus_sha256": corpus_sha,
    }
    for v in variants:
        reference = None if v.name in (BASELINE, UNTUNED) else f"evaluate.{BASELINE}"
        cfg = {
            "variant": v.name,
            "format": v.format,
            "max_length": recipe.bundle.max_length,
            "batch_size": recipe.evaluate.batch_size,
            "reference": reference,
            "corpus": emb.corpus,
            "corpus_text": emb.corpus_text,
            "corpus_rows": emb.corpus_rows,
            "neighbours": emb.neighbours,
        }
        inputs = tuple(dict.fromkeys([v.source, "finetune", *([reference] if reference else [])]))
        calls.append(StageCall(f"evaluate.{v.name}", "embed-evaluate", cfg, inputs, measured))
    bench_cfg = {
        **recipe.bench.model_dump(mode="json"),
        "threads": ctx.threads,
        "max_length": recipe.bundle.max_length,
        "variants": [v.__dict__ for v in variants],
    }
    sources = tuple(dict.fromkeys([v.source for v in variants] + ["finetune"]))
    calls.append(StageCall("bench", "bench", bench_cfg, sources, eval_identity))
    return calls, variants


def variant_rows(ctx: RunContext, variants: list[Variant]) -> list[EmbedderRow]:
    """One row per variant: Spearman on the eval pairs (the choice's metric) and the test pairs, the fidelity to fp32,
    size and latency as for classifiers, and the eval pairs whose similarity moved most."""
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    metrics = {
        v.name: json.loads(ctx.artifacts[f"evaluate.{v.name}"].file("metrics.json").read_text()) for v in variants
    }
    base = metrics[BASELINE]
    base_cases = bench["variants"][BASELINE]["cases"]
    evl = ctx.eval
    rows = []
    for v in variants:
        m, b, meta = metrics[v.name], bench["variants"][v.name], ctx.artifacts[v.source].meta
        splits = [s for s in ("eval", "test") if s in m]
        row = cast(
            EmbedderRow,
            {
                "name": v.name,
                "format": v.format,
                "precision": v.precision,
                "metric": "spearman",
                "accuracy": m["eval"]["spearman"] / 100,
                "correct": None,
                "eval_rows": m["eval"]["pairs"],
                "accuracy_drop": (base["eval"]["spearman"] - m["eval"]["spearman"]) / 100,
                "spearman": {s: m[s]["spearman"] for s in splits},
                "pearson": {s: m[s]["pearson"] for s in splits},
                "fidelity": m.get("fidelity"),
                **measured_fields(b, base_cases, meta, ctx.artifacts[v.source].id),
            },
        )
        if v.name == UNTUNED:
            row["reference"] = True
        elif v.name != BASELINE:
            assert evl.pairs is not None
            row["moved_pairs"] = moved_pairs(
                np.asarray(base["eval"]["cosines"]),
                np.asarray(m["eval"]["cosines"]),
                evl.texts,
                evl.pairs,
                evl.labels,
            )
        rows.append(row)
    return rows


class Embedding:
    name = "embedding"
    distributed_stage: str | None = None

    def matches(self, recipe: Recipe) -> bool:
        return recipe.embedding is not None

    def expect_resources(self, ctx: RunContext) -> dict[str, Any]:
        return resources.expect(ctx.recipe, ctx.run_dir)

    def plan(self, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
        return plan(ctx)

    def rows(self, ctx: RunContext, variants: list[Variant]) -> list[EmbedderRow]:
        return variant_rows(ctx, variants)

    def choose(self, rows: list[EmbedderRow], recipe: Recipe) -> Choice[EmbedderRow]:
        return choose_variant(rows, recipe.budget, metric="Spearman", resolution=SPEARMAN_RESOLUTION)

    def explain(self, choice: Choice[EmbedderRow]) -> str:
        return choice_table(choice)  # type: ignore[arg-type]

    def bundle_call(self, ctx: RunContext, variants: list[Variant], choice: Choice[EmbedderRow]) -> StageCall:
        recipe = ctx.recipe
        variant = next(v for v in variants if v.name == choice.shipped)
        return StageCall(
            "bundle",
            "embed-bundle",
            {
                "shipped": choice.shipped,
                "name": recipe.name,
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
        self, ctx: RunContext, rows: list[EmbedderRow], choice: Choice[EmbedderRow], bundle: Path | None
    ) -> Path:
        return report.write(ctx, rows, choice, bundle)


register_task(Embedding())
