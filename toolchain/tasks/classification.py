"""Text classification: fine-tune an encoder with a classification head, distill, export, fuse, quantize, evaluate
every variant on the whole eval split, time them in fresh processes, ship the fastest within the budget."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

# the stages this task plans: importing them registers them
import toolchain.stages.bench
import toolchain.stages.bundle
import toolchain.stages.distill
import toolchain.stages.evaluate
import toolchain.stages.export
import toolchain.stages.finetune
import toolchain.stages.openvino_nncf_baseline
import toolchain.stages.optimize
import toolchain.stages.optimum_baseline
import toolchain.stages.quantize
import toolchain.stages.teacher_logits  # noqa: F401
from toolchain import resources
from toolchain.choose import (
    BASELINE,
    OPENVINO_BF16,
    OPENVINO_NNCF,
    OPTIMUM_BASELINE,
    PEERS,
    choice_table,
    choose_variant,
)
from toolchain.compile.parity import graph_file
from toolchain.core.artifact import StageCall
from toolchain.core.context import RunContext
from toolchain.core.task import Choice, Variant, register_task
from toolchain.evaluate.stats import ratio_interval
from toolchain.models import source_identity
from toolchain.recipe.schema import Recipe
from toolchain.report import classification as report
from toolchain.report.rows import ClassifierRow, latency_case
from toolchain.runtime import sha256_file
from toolchain.stages.optimize import no_fusions_for

log = logging.getLogger("toolchain")


TEACHER_EXPORT = "export.teacher"  # a distilled recipe's export of the teacher, which its peers are built from


def model_key(recipe: Recipe) -> str:
    """The artifact holding the model that is exported: the distilled student, else the fine-tuned model."""
    return "distill" if recipe.compile.distill is not None else "finetune"


# long: the task's whole plan, stage by stage in run order, each id's inputs beside it
def plan(ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
    """The stage calls for a recipe, in order, and the variants they produce."""
    recipe = ctx.recipe
    d, ft, comp = recipe.data, recipe.finetune, recipe.compile
    train, evl = ctx.splits
    data_identity = {"text": d.text, "label": d.label, "labels": d.labels}
    eval_identity = {**data_identity, "eval_sha256": evl.sha256, "eval_rows": len(evl)}
    # the validation rows' hash, for the stages that read them
    validation = {"validation_sha256": ctx.validation.sha256} if ctx.validation is not None else {}
    calls = [
        StageCall(
            "finetune",
            "finetune",
            ctx.training_config(ft),
            identity={
                "model": source_identity(recipe.model.source, recipe.model),
                **data_identity,
                "train_sha256": train.sha256,
                "max_train_rows": d.max_train_rows,
                **validation,
            },
            settings={"checkpoint_every": ft.checkpoint_every, "access": recipe.model.model_dump(mode="json")},
        ),
    ]
    variants = [Variant("pytorch-fp32", "finetune", "pytorch", "fp32")]
    if comp.distill is not None:
        train_identity = {**data_identity, "train_sha256": train.sha256, "max_train_rows": d.max_train_rows}
        # with hidden-state or attention transfer the teacher runs beside the student: its logits come from there
        online = comp.distill.hidden_weight > 0 or comp.distill.attention_weight > 0
        if not online:
            calls.append(
                StageCall(
                    "teacher-logits",
                    "teacher-logits",
                    {"max_length": comp.distill.max_length},
                    ("finetune",),
                    train_identity,
                )
            )
        calls.append(
            StageCall(
                "distill",
                "distill",
                ctx.training_config(comp.distill),
                ("finetune",) if online else ("finetune", "teacher-logits"),
                {
                    **train_identity,
                    "validation": ft.validation.model_dump(mode="json") if ft.validation else None,
                    **validation,
                },
                settings={"checkpoint_every": comp.distill.checkpoint_every},
            )
        )
        variants.append(Variant("pytorch-fp32-student", "distill", "pytorch", "fp32"))
    calls.append(
        StageCall(
            "export",
            "export",
            # max_length: the parity reference is computed at the length the bundle runs at
            {**comp.export.model_dump(mode="json"), "max_length": recipe.bundle.max_length},
            (model_key(recipe),),
            eval_identity,
        )
    )
    variants.append(Variant("onnx-fp32", "export", "onnx", "fp32"))
    fp32 = "export"
    unfused = no_fusions_for(recipe)
    if unfused:  # an optimized variant would be the exported graph again, evaluated and timed twice
        log.info("optimize: skipped, %s", unfused.removeprefix("none: "))
    elif comp.optimize:
        calls.append(
            StageCall("optimize", "optimize", {"atol": comp.export.atol}, ("export", model_key(recipe)), eval_identity)
        )
        variants.append(Variant("onnx-fp32-optimized", "optimize", "onnx", "fp32"))
        fp32 = "optimize"
    for q in comp.quantize:
        key = f"quantize.{q.variant_name}"
        # A QAT export starts from the fake-quant model in the finetune artifact, not from the fp32 graph.
        # Static QDQ starts from the unfused export: ONNX shape inference cannot type the outputs of the fused
        # contrib ops (Attention, SkipLayerNormalization), and untyped activations are silently left unquantized.
        # NNCF starts from the export too: OpenVINO reads standard ONNX, not onnxruntime's fused contrib ops.
        source = {"qat-qdq": "finetune", "static-int8": "export", "nncf-int8": "export"}.get(q.mode, fp32)
        identity: dict[str, Any] = {
            **eval_identity,
            "export": comp.export.model_dump(mode="json"),
            "max_length": recipe.bundle.max_length,
            "seed": ft.seed,  # of the calibration and selection samples
        }
        if q.mode in ("static-int8", "nncf-int8") or q.ranks_nodes:  # calibrated on / selected with training rows
            identity["train_sha256"] = train.sha256
        if q.ranks_nodes:  # ranked and selected at the evaluation batch size, against the budget
            identity |= validation
            identity["selection"] = {
                "validation": ft.validation.model_dump(mode="json") if ft.validation else None,
                "auto_file_sha256": sha256_file(recipe.data_root() / q.auto_file) if q.auto_file else None,
                "batch_size": recipe.evaluate.batch_size,
                "max_accuracy_drop": recipe.budget.max_accuracy_drop,
            }
        if q.mode == "qat-qdq":  # rebuilds the fake-quant model the finetune stage trained
            identity["finetune"] = ctx.training_config(ft)
        # the reference logits come from the export, the tokenizer from the fine-tuned model
        inputs = tuple(dict.fromkeys((source, "export", "finetune")))
        calls.append(StageCall(key, "quantize", q.stage_config(), inputs, identity))
        variants.append(Variant(q.variant_name, key, "openvino" if q.mode == "nncf-int8" else "onnx", q.precision))
    # The peers are built from the reference's weights (the fine-tuned model), as a user of each tool would: with a
    # distilled student that is a second export, of the teacher.
    peer_export = "export"
    if comp.distill is not None and (recipe.bench.optimum_baseline or recipe.bench.openvino_peers):
        peer_export = TEACHER_EXPORT
        calls.append(
            StageCall(
                TEACHER_EXPORT,
                "export",
                {**comp.export.model_dump(mode="json"), "max_length": recipe.bundle.max_length},
                ("finetune",),
                eval_identity,
            )
        )
    if recipe.bench.optimum_baseline:
        calls.append(
            StageCall(
                "optimum-baseline",
                "optimum-baseline",
                {"preset": ctx.cpu_preset},
                ("finetune", peer_export),  # the model, and the export holding its PyTorch reference logits
                {**eval_identity, "export": comp.export.model_dump(mode="json")},
            )
        )
        variants.append(Variant(OPTIMUM_BASELINE, "optimum-baseline", "onnx", "int8"))
    if recipe.bench.openvino_peers:
        # what OpenVINO's documented defaults make of the exported weights: bf16 inference, and NNCF's int8
        variants.append(Variant(OPENVINO_BF16, peer_export, "openvino", "bf16"))
        calls.append(
            StageCall(
                "openvino-nncf-baseline",
                "openvino-nncf-baseline",
                {"rows": 300, "max_length": recipe.bundle.max_length, "seed": ft.seed},
                (peer_export, "finetune"),  # the graph, and the tokenizer beside the weights
                {**data_identity, "train_sha256": train.sha256, "max_train_rows": d.max_train_rows},
            )
        )
        variants.append(Variant(OPENVINO_NNCF, "openvino-nncf-baseline", "openvino", "int8"))
    eval_cfg = {"max_length": recipe.bundle.max_length, "batch_size": recipe.evaluate.batch_size}
    # the toolchain's OpenVINO variants run at the bundle's shape buckets; the peers as OpenVINO's defaults
    buckets = {
        v.name: recipe.bundle.buckets()
        for v in variants
        if v.format == "openvino" and v.name not in PEERS and recipe.bundle.buckets()
    }
    for v in variants:
        inputs = tuple(dict.fromkeys((v.source, "finetune")))
        calls.append(
            StageCall(
                f"evaluate.{v.name}",
                "evaluate",
                {**eval_cfg, "variant": v.name, "format": v.format}
                | ({"precision": v.precision} if v.format == "openvino" else {})
                | ({"buckets": buckets[v.name]} if v.name in buckets else {}),
                inputs,
                eval_identity,
            )
        )
    bench_cfg = {
        **recipe.bench.model_dump(mode="json"),
        "threads": ctx.threads,
        "max_length": recipe.bundle.max_length,
        "variants": [v.__dict__ for v in variants],
        **({"buckets": buckets} if buckets else {}),
    }
    calls.append(
        StageCall(
            "bench",
            "bench",
            bench_cfg,
            tuple(dict.fromkeys([v.source for v in variants] + ["finetune"])),
            eval_identity,
        )
    )
    return calls, variants


def variant_rows(ctx: RunContext, variants: list[Variant]) -> list[ClassifierRow]:
    """One row per variant: accuracy (whole eval split), size, latency percentiles per case, raw samples, and how it
    compares with the PyTorch fp32 baseline (accuracy drop, latency ratios, changed predictions)."""
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    metrics = {
        v.name: json.loads(ctx.artifacts[f"evaluate.{v.name}"].file("metrics.json").read_text()) for v in variants
    }
    base = next((v for v in variants if v.name == BASELINE), variants[0])
    base_cases = bench["variants"][base.name]["cases"]
    rows = []
    for v in variants:
        m, b, meta = metrics[v.name], bench["variants"][v.name], ctx.artifacts[v.source].meta
        cases = b["cases"]
        row: ClassifierRow = {
            "name": v.name,
            "format": v.format,
            "precision": v.precision,
            "accuracy": m["accuracy"],
            "correct": m["correct"],
            "eval_rows": m["rows"],
            "accuracy_drop": metrics[base.name]["accuracy"] - m["accuracy"],
            "size_bytes": b["size_bytes"],
            "peak_rss_bytes": b.get("peak_rss_bytes"),
            "cold_start_seconds": b.get("cold_start_seconds"),
            "latency_ms": {c: latency_case(r) for c, r in cases.items()},
            "latency_samples_ms": {c: r["samples_ms"] for c, r in cases.items()},
            "round_p50": {c: r["round_p50"] for c, r in cases.items() if "round_p50" in r},
            # the source's parity was measured through its own runtime: not this variant's when OpenVINO runs an
            # ONNX graph (openvino-bf16)
            "parity": None
            if v.format == "openvino" and graph_file(ctx.artifacts[v.source].path).suffix == ".onnx"
            else meta.get("parity") or meta.get("drift_vs_pytorch"),
            "peer": v.name in PEERS,
            "compression": {k: meta[k] for k in ("mode", "excluded", "sensitivity", "auto", "fusions") if k in meta}
            | ({"fusions": unfused} if v.name == "onnx-fp32" and (unfused := no_fusions_for(ctx.recipe)) else {}),
            "artifact": ctx.artifacts[v.source].id,
            "latency_ratio_to_pytorch": {c: cases[c]["p50"] / base_cases[c]["p50"] for c in cases},
            "latency_ratio_ci": {
                c: ratio_interval(cases[c]["round_p50"], base_cases[c]["round_p50"])
                for c in cases
                if cases[c].get("round_p50") and base_cases[c].get("round_p50")
            },
        }
        if v.name != base.name:
            row["changed_vs_fp32"] = changed_predictions(
                metrics[base.name],
                m,
                ctx.eval.texts,
                ctx.eval.labels.tolist(),
                ctx.recipe.data.labels,
            )
        rows.append(row)
    return rows


def changed_predictions(
    base: dict[str, Any], other: dict[str, Any], texts: list[str], labels: list[int], names: list[str], keep: int = 50
) -> dict[str, Any]:
    """Eval rows whose prediction differs from the fp32 baseline, counted by direction: `broken` (baseline right,
    variant wrong), `fixed` (the reverse), `other` (both wrong, differently). The first `keep` changed rows, in
    eval order, are listed with both predictions and confidences."""
    counts = {"broken": 0, "fixed": 0, "other": 0}
    rows: list[dict[str, Any]] = []
    for i, (a, b) in enumerate(zip(base["predictions"], other["predictions"], strict=True)):
        if a == b:
            continue
        kind = "broken" if a == labels[i] else "fixed" if b == labels[i] else "other"
        counts[kind] += 1
        if len(rows) < keep:
            rows.append(
                {
                    "row": i,
                    "direction": kind,
                    "text": texts[i],
                    "label": names[labels[i]],
                    "fp32": names[a],
                    "fp32_confidence": base["confidences"][i],
                    "variant": names[b],
                    "variant_confidence": other["confidences"][i],
                }
            )
    return {**counts, "changed": sum(counts.values()), "rows": rows}


class Classification:
    name = "classification"
    distributed_stage: str | None = "finetune"

    def matches(self, recipe: Recipe) -> bool:
        return recipe.generation is None and recipe.embedding is None and recipe.tagging is None and not recipe.is_pair

    def expect_resources(self, ctx: RunContext) -> dict[str, Any]:
        return resources.expect(ctx.recipe, ctx.run_dir)

    def plan(self, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
        return plan(ctx)

    def rows(self, ctx: RunContext, variants: list[Variant]) -> list[ClassifierRow]:
        return variant_rows(ctx, variants)

    def choose(self, rows: list[ClassifierRow], recipe: Recipe) -> Choice[ClassifierRow]:
        return choose_variant(rows, recipe.budget)

    def explain(self, choice: Choice[ClassifierRow]) -> str:
        return choice_table(choice)

    def bundle_call(self, ctx: RunContext, variants: list[Variant], choice: Choice[ClassifierRow]) -> StageCall:
        recipe = ctx.recipe
        shipped = [v.source for v in variants if v.name == choice.shipped]
        variant = next(v for v in variants if v.name == choice.shipped)
        return StageCall(
            "bundle",
            "bundle",
            {
                "shipped": choice.shipped,
                "max_length": recipe.bundle.max_length,
                "ort_format": recipe.bundle.ort_format,
                "tokenizer": recipe.bundle.tokenizer,
                "batch_size": recipe.evaluate.batch_size,
                "budget": recipe.budget.model_dump(mode="json"),
                "name": recipe.name,
                "labels": recipe.data.labels,
                "eval_file": recipe.data.eval,
                "eval_text": ctx.eval.texts[0],
                "format": variant.format,
                "precision": variant.precision,
                **({"shape_buckets": recipe.bundle.buckets()} if variant.format == "openvino" else {}),
            },
            tuple(dict.fromkeys(["finetune", *shipped, *(f"evaluate.{v.name}" for v in variants), "bench"])),
            {
                "recipe": recipe.model_dump(mode="json"),
                "eval_sha256": ctx.eval.sha256,
                "base_model": source_identity(recipe.model.source, recipe.model),
            },
        )

    def write_report(
        self, ctx: RunContext, rows: list[ClassifierRow], choice: Choice[ClassifierRow], bundle: Path | None
    ) -> Path:
        return report.write(ctx, rows, choice, bundle=bundle)


register_task(Classification())
