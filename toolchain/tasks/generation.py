"""Generation: a decoder LM that classifies by answering with a label word. LoRA on prompt + answer, export with the
KV cache, weight-only int4/int8, accuracy by generation on the whole eval split, agreement of greedy continuations,
decode speed in fresh processes; ship the fastest decoder within the budget (toolchain.runtime.Generator loads it)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

# the stages this task plans: importing them registers them
import toolchain.stages.llm_base
import toolchain.stages.llm_bench
import toolchain.stages.llm_bundle
import toolchain.stages.llm_evaluate
import toolchain.stages.llm_export
import toolchain.stages.llm_finetune
import toolchain.stages.llm_peer
import toolchain.stages.llm_quantize  # noqa: F401
from toolchain.choose import BASELINE
from toolchain.core.artifact import StageCall
from toolchain.core.context import RunContext
from toolchain.core.task import Choice, Variant, register_task
from toolchain.llm import peers
from toolchain.models import gguf_file, resolve_source, source_identity
from toolchain.recipe.schema import Recipe
from toolchain.report import generation as report
from toolchain.report.rows import GeneratorRow
from toolchain.resources import GB, ResourceError
from toolchain.runtime import sha256_file
from toolchain.stages.llm_peer import model_bytes

log = logging.getLogger("toolchain")

UNTUNED = "pytorch-untuned"
PEERS_FORMATS = (peers.GENAI, peers.LLAMA)
PEER_KIND = {"ort-genai-int4": peers.GENAI, "llama.cpp-q4_0": peers.LLAMA, "llama.cpp-q4_k_m": peers.LLAMA}


# long: the task's whole plan, stage by stage in run order, each id's inputs beside it
def plan(ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
    recipe = ctx.recipe
    g, d, ft = recipe.generation, recipe.data, recipe.finetune
    assert g is not None
    train, evl = ctx.splits
    task_identity = {"template": g.template, "chat": g.chat, "labels": d.labels, "text": d.text, "label": d.label}
    eval_identity = {**task_identity, "eval_sha256": evl.sha256, "eval_rows": len(evl), "stop_strings": g.stop_strings}
    calls = [
        StageCall(
            "llm-base",
            "llm-base",
            {},
            (),
            {"model": source_identity(recipe.model.source, recipe.model)},
            settings={"access": recipe.model.model_dump(mode="json")},
        ),
        StageCall(
            "llm-finetune",
            "llm-finetune",
            ctx.training_config(ft),
            ("llm-base",),
            {**task_identity, "train_sha256": train.sha256, "max_train_rows": d.max_train_rows},
            settings={"checkpoint_every": ft.checkpoint_every},
        ),
        StageCall(
            "llm-export",
            "llm-export",
            {
                "opset": recipe.compile.export.opset,
                "atol": recipe.compile.export.atol,
                "parity_steps": 8,
                "graph": g.graph,
            },
            ("llm-finetune",),
            eval_identity,
        ),
    ]
    variants = [
        Variant(UNTUNED, "llm-base", "pytorch", "fp32"),
        Variant(BASELINE, "llm-finetune", "pytorch", "fp32"),
        Variant("onnx-fp32", "llm-export", "onnx", "fp32"),
    ]
    for q in recipe.compile.quantize:
        key = f"llm-quantize.{q.variant_name}"
        config: dict[str, Any] = {
            "bits": q.weight_bits,
            "block_size": q.block_size,
            "symmetric": q.symmetric,
            "accuracy_level": q.accuracy_level,
            "exclude": q.exclude if isinstance(q.exclude, list) else None,
            "int8_nodes": q.int8_nodes,
        }
        inputs: tuple[str, ...] = ("llm-export",)
        identity: dict[str, Any] = {}
        if q.sensitivity:
            assert q.auto_file is not None  # the schema requires it with sensitivity
            config |= {"sensitivity": True, "auto_file": q.auto_file, "sensitivity_rows": q.sensitivity_rows}
            inputs = ("llm-export", "llm-finetune")
            identity = {**task_identity, "auto_file_sha256": sha256_file(recipe.data_root() / q.auto_file)}
        if q.lm_head_block_size is not None:  # only when set, as awq: the ids of the other variants stay as they were
            config["lm_head_block_size"] = q.lm_head_block_size
        if q.awq or q.gptq:  # only when set: the ids of the other variants stay as they were
            config |= {"calibration_rows": q.calibration_rows}
            config |= {what: True for what in ("awq", "gptq") if getattr(q, what)}
            inputs = ("llm-export", "llm-finetune")
            identity = {**task_identity, **identity, "train_sha256": train.sha256}
        calls.append(StageCall(key, "llm-quantize", config, inputs, identity))
        variants.append(Variant(q.variant_name, key, "onnx", q.precision))
    for name in g.peers:  # built by the peer's tool from the tuned weights (a peer that cannot be built: skipped)
        kind = PEER_KIND[name]
        if name in ctx.skipped:
            continue
        key = f"llm-peer.{kind}"
        if key not in {c.key for c in calls}:
            config = {"peer": kind, "environment": peers.SPECS[kind]}
            calls.append(StageCall(key, "llm-peer", config, ("llm-finetune",)))
        variants.append(Variant(name, key, kind, "int4"))
    for v in variants:
        calls.append(
            StageCall(
                f"llm-evaluate.{v.name}",
                "llm-evaluate",
                {
                    "variant": v.name,
                    "format": v.format,
                    "source": v.source,
                    "tokenizer_from": "llm-finetune" if v.name != UNTUNED else "llm-base",
                    "max_new_tokens": g.untuned_max_new_tokens if v.name == UNTUNED else g.max_new_tokens,
                    "agreement": v.format in ("pytorch", "onnx") and v.name != UNTUNED,
                    "eval_batch_size": g.eval_batch_size,
                    "agreement_prompts": g.agreement_prompts,
                    "agreement_tokens": g.agreement_tokens,
                },
                tuple(dict.fromkeys([v.source, "llm-finetune" if v.name != UNTUNED else "llm-base"])),
                eval_identity,
            )
        )
    timed = [v for v in variants if v.name != UNTUNED]
    calls.append(
        StageCall(
            "llm-bench",
            "llm-bench",
            {
                "variants": [v.__dict__ for v in timed],
                "threads": ctx.threads,
                "prompts": g.bench_prompts,
                "new_tokens": g.bench_new_tokens,
                "rounds": g.bench_rounds,
                "passes": g.bench_passes,
            },
            tuple(dict.fromkeys([v.source for v in timed] + ["llm-finetune"])),
            eval_identity,
        )
    )
    return calls, variants


def rows(ctx: RunContext, variants: list[Variant]) -> list[GeneratorRow]:
    """One row per variant: accuracy, agreement with onnx-fp32, size, timings (untuned: accuracy only)."""
    bench = json.loads(ctx.artifacts["llm-bench"].file("bench.json").read_text())["variants"]
    reference = _agreement_ids(ctx, "onnx-fp32")
    base = json.loads(ctx.artifacts[f"llm-evaluate.{BASELINE}"].file("metrics.json").read_text())
    out = []
    for v in variants:
        metrics = json.loads(ctx.artifacts[f"llm-evaluate.{v.name}"].file("metrics.json").read_text())
        art = ctx.artifacts[v.source]
        if v.format == "pytorch":
            size = sum(p.stat().st_size for p in art.path.glob("*.safetensors"))
        elif v.format == "onnx":
            size = art.file("model.onnx").stat().st_size
        else:
            size = model_bytes(art, v.name)
        row: GeneratorRow = {
            "name": v.name,
            "format": v.format,
            "precision": v.precision,
            "accuracy": metrics["accuracy"],
            "correct": metrics["correct"],
            "eval_rows": metrics["eval_rows"],
            "unparsed": metrics["unparsed"],
            "max_new_tokens": metrics["max_new_tokens"],
            "eval_batch_size": metrics.get("batch_size"),
            "prefix_tokens": len(metrics.get("prefix_ids", [])),
            "accuracy_drop": base["accuracy"] - metrics["accuracy"],
            "size_bytes": size,
        }
        if v.format in PEERS_FORMATS:
            row["peer"] = True
        ids = _agreement_ids(ctx, v.name)
        if ids is not None and reference is not None:
            row["agreement_with_onnx_fp32"] = agreement(ids, reference)
        if v.name in bench:
            b = bench[v.name]
            row["ttft_ms"] = b["ttft_ms"]
            row["decode_tokens_per_second"] = b["decode_tokens_per_second"]
            row["decode_tokens_per_second_rounds"] = b["decode_tokens_per_second_rounds"]
            row["peak_rss_bytes"] = b["peak_rss_bytes"]
            row["load_seconds"] = b["load_seconds"]
            row["decode_outside_run_share"] = b.get("decode_outside_run_share")
        out.append(row)
    pt = next(r for r in out if r["name"] == BASELINE)
    for r in out:
        if "decode_tokens_per_second" in r and "decode_tokens_per_second" in pt:
            r["decode_speedup"] = r["decode_tokens_per_second"] / pt["decode_tokens_per_second"]
    return out


def _agreement_ids(ctx: RunContext, name: str) -> list[list[int]] | None:
    art = ctx.artifacts.get(f"llm-evaluate.{name}")
    if art is None or not art.file("agreement.json").is_file():
        return None
    ids: list[list[int]] = json.loads(art.file("agreement.json").read_text())
    return ids


def agreement(ids: list[list[int]], reference: list[list[int]]) -> dict[str, Any]:
    """How a variant's greedy continuations match the reference's: the share of prompts whose token sequences are
    identical, and the share of reference tokens generated before the first difference."""
    same = sum(a == b for a, b in zip(ids, reference, strict=True))
    prefix = 0
    for a, b in zip(ids, reference, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
    total = sum(len(b) for b in reference)
    return {
        "prompts": len(reference),
        "identical": same,
        "identical_rate": same / len(reference),
        "token_prefix_rate": prefix / total if total else 1.0,
    }


def choose(rows: list[GeneratorRow], recipe: Recipe) -> Choice[GeneratorRow]:
    """The ONNX variant with the most decode tokens/s among those within every budget."""
    b = recipe.budget
    verdicts: dict[str, str] = {}
    qualified: list[GeneratorRow] = []
    for r in rows:
        if r.get("peer"):
            verdicts[r["name"]] = "peer (what a user of that tool gets from the same tuned weights; never shipped)"
            continue
        if r["format"] != "onnx":
            verdicts[r["name"]] = "baseline (not shippable: the bundle is ONNX)"
            continue
        reasons = []
        if r["accuracy_drop"] > b.max_accuracy_drop + 1e-9:
            reasons.append(f"accuracy drop {r['accuracy_drop'] * 100:.2f} pts > budget {b.max_accuracy_drop * 100:.2f}")
        speedup = r.get("decode_speedup", 0.0)  # every ONNX variant is timed
        if b.min_speedup is not None and speedup < b.min_speedup:
            reasons.append(f"decode {speedup:.2f}x PyTorch < budget {b.min_speedup:.2f}x")
        if b.max_size_mb is not None and r["size_bytes"] / 1e6 > b.max_size_mb:
            reasons.append(f"{r['size_bytes'] / 1e6:.1f} MB > budget {b.max_size_mb:.1f} MB")
        if reasons:
            verdicts[r["name"]] = "rejected: " + "; ".join(reasons)
        else:
            qualified.append(r)
    if not qualified:
        return Choice(None, "decode_tokens_per_second", verdicts, rows)
    best = max(qualified, key=lambda r: r.get("decode_tokens_per_second", 0.0))
    for r in qualified:
        verdicts[r["name"]] = "shipped: most decode tokens/s within budget" if r is best else "within budget, slower"
    return Choice(best["name"], "decode_tokens_per_second", verdicts, rows)


def check_disk(ctx: RunContext) -> None:
    """Fail before any compute when the disk cannot hold the run: about 5 fp32 copies of the model (base, tuned,
    ONNX, quantized) plus the stages' temporaries."""
    folder = resolve_source(ctx.recipe.model.source, ctx.recipe.model)
    params_bytes = _fp32_bytes(folder)
    need = params_bytes * (3 + len(ctx.recipe.compile.quantize)) + params_bytes  # + a stage's temporary copy
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ctx.run_dir).free
    log.info("expects about %.1f GB of artifacts (%.1f GB free here)", need / GB, free / GB)
    if need > free:
        raise ResourceError(
            f"{ctx.run_dir}: about {need / GB:.1f} GB are needed and {free / GB:.1f} GB are free; free disk space or "
            "set --runs to a larger disk"
        )
    ctx.resources = {"disk_bytes": need, "disk_free_bytes": free}


def _fp32_bytes(folder: Path) -> int:
    """fp32 bytes of the model's parameters (a GGUF file's tensors counted by their element counts)."""
    name = gguf_file(folder)
    if name is None:
        return 2 * sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # fp16/bf16 weights count double
    from gguf import GGUFReader

    return 4 * sum(int(t.n_elements) for t in GGUFReader(str(folder / name)).tensors)


def prepare_peers(ctx: RunContext) -> None:
    """Build the environments of the recipe's peers that are not ready (`make peers` builds them ahead); a peer
    whose environment cannot be built is left out of the plan, the reason in the report."""
    g = ctx.recipe.generation
    assert g is not None
    failed: dict[str, str] = {}
    for kind in dict.fromkeys(PEER_KIND[name] for name in g.peers):
        try:
            peers.build(kind)
        except (RuntimeError, OSError) as e:
            failed[kind] = f"its environment could not be built: {e}"
            log.warning("peers: %s skipped: %s", kind, failed[kind])
    ctx.skipped |= {name: failed[PEER_KIND[name]] for name in g.peers if PEER_KIND[name] in failed}


class Generation:
    name = "generation"
    distributed_stage: str | None = None  # LoRA on a decoder trains in one process

    def matches(self, recipe: Recipe) -> bool:
        return recipe.generation is not None

    def expect_resources(self, ctx: RunContext) -> dict[str, Any]:
        check_disk(ctx)
        prepare_peers(ctx)
        return ctx.resources

    def plan(self, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
        return plan(ctx)

    def rows(self, ctx: RunContext, variants: list[Variant]) -> list[GeneratorRow]:
        return rows(ctx, variants)

    def choose(self, rows: list[GeneratorRow], recipe: Recipe) -> Choice[GeneratorRow]:
        return choose(rows, recipe)

    def explain(self, choice: Choice[GeneratorRow]) -> str:
        return report.table(choice.rows, choice.verdicts)

    def bundle_call(self, ctx: RunContext, variants: list[Variant], choice: Choice[GeneratorRow]) -> StageCall:
        recipe, g = ctx.recipe, ctx.recipe.generation
        assert g is not None
        source = next(v.source for v in variants if v.name == choice.shipped)
        return StageCall(
            "bundle",
            "llm-bundle",
            {
                "shipped": choice.shipped,
                "budget": recipe.budget.model_dump(mode="json"),
                "name": recipe.name,
                "eval_file": recipe.data.eval,
                "labels": recipe.data.labels,
                "template": g.template,
                "chat": g.chat,
                "max_new_tokens": g.max_new_tokens,
                "stop_strings": g.stop_strings,
            },
            tuple(dict.fromkeys(["llm-finetune", source, f"llm-evaluate.{choice.shipped}", "llm-bench"])),
            {
                "recipe": recipe.model_dump(mode="json"),
                "eval_sha256": ctx.eval.sha256,
                "base_model": source_identity(recipe.model.source, recipe.model),
            },
        )

    def write_report(
        self, ctx: RunContext, rows: list[GeneratorRow], choice: Choice[GeneratorRow], bundle: Path | None
    ) -> Path:
        return report.write(ctx, rows, choice, bundle)


register_task(Generation())
