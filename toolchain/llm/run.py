"""The generation pipeline: plan the stages of a recipe with a `generation` section, run them (cached like every
stage), choose the variant to ship, write the bundle (`toolchain.runtime.Generator` loads it) and the report."""

from __future__ import annotations

import json
import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import StageError, ToolchainError
from toolchain.pipeline import (
    Artifact,
    RunContext,
    StageCall,
    _rel,
    phase,
    prepare_run_dir,
    run_lock,
    run_stage,
    sha256_file,
    write_lineage,
)
from toolchain.recipe import NOT_IN_STAGE_ID, Recipe
from toolchain.registry import register
from toolchain.runtime import GENERATOR_MANIFEST_VERSION

log = logging.getLogger("toolchain")

BASELINE = "pytorch-fp32"
UNTUNED = "pytorch-untuned"


@dataclass(frozen=True)
class LlmVariant:
    name: str
    source: str  # the stage key whose artifact holds it
    format: str  # pytorch | onnx
    precision: str


def plan(recipe: Recipe, ctx: RunContext) -> tuple[list[StageCall], list[LlmVariant]]:
    from toolchain.models import source_identity

    g, d, ft = recipe.generation, recipe.data, recipe.finetune
    assert g is not None
    train, evl = ctx.splits
    task_identity = {"template": g.template, "chat": g.chat, "labels": d.labels, "text": d.text, "label": d.label}
    eval_identity = {**task_identity, "eval_sha256": evl.sha256, "eval_rows": len(evl), "stop_strings": g.stop_strings}
    calls = [
        StageCall("llm-base", "llm-base", {}, (), {"model": source_identity(recipe.model.source, recipe.model)}),
        StageCall(
            "llm-finetune",
            "llm-finetune",
            ft.model_dump(mode="json", exclude=NOT_IN_STAGE_ID),
            ("llm-base",),
            {**task_identity, "train_sha256": train.sha256, "max_train_rows": d.max_train_rows},
        ),
        StageCall(
            "llm-export",
            "llm-export",
            {"opset": recipe.compile.export.opset, "atol": recipe.compile.export.atol, "parity_steps": 8},
            ("llm-finetune",),
            eval_identity,
        ),
    ]
    variants = [
        LlmVariant(UNTUNED, "llm-base", "pytorch", "fp32"),
        LlmVariant(BASELINE, "llm-finetune", "pytorch", "fp32"),
        LlmVariant("onnx-fp32", "llm-export", "onnx", "fp32"),
    ]
    for q in recipe.compile.quantize:
        key = f"llm-quantize.{q.variant_name}"
        config = {
            "bits": q.weight_bits,
            "block_size": q.block_size,
            "symmetric": q.symmetric,
            "accuracy_level": q.accuracy_level,
            "exclude": q.exclude if isinstance(q.exclude, list) else None,
            "int8_nodes": q.int8_nodes,
        }
        inputs: tuple[str, ...] = ("llm-export",)
        identity = {}
        if q.sensitivity:
            config |= {"sensitivity": True, "auto_file": q.auto_file, "sensitivity_rows": q.sensitivity_rows}
            inputs = ("llm-export", "llm-finetune")
            identity = {**task_identity, "auto_file_sha256": sha256_file(recipe.data_root() / q.auto_file)}
        calls.append(StageCall(key, "llm-quantize", config, inputs, identity))
        variants.append(LlmVariant(q.variant_name, key, "onnx", q.precision))
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
                    "agreement": v.name != UNTUNED,
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
            },
            tuple(dict.fromkeys([v.source for v in timed] + ["llm-finetune"])),
            eval_identity,
        )
    )
    return calls, variants


def rows(ctx: RunContext, variants: list[LlmVariant]) -> list[dict[str, Any]]:
    """One row per variant: accuracy, agreement with onnx-fp32, size, timings (untuned: accuracy only)."""
    bench = json.loads(ctx.artifacts["llm-bench"].file("bench.json").read_text())["variants"]
    reference = _agreement_ids(ctx, "onnx-fp32")
    base = json.loads(ctx.artifacts[f"llm-evaluate.{BASELINE}"].file("metrics.json").read_text())
    out = []
    for v in variants:
        metrics = json.loads(ctx.artifacts[f"llm-evaluate.{v.name}"].file("metrics.json").read_text())
        art = ctx.artifacts[v.source]
        size = (
            sum(p.stat().st_size for p in art.path.glob("*.safetensors"))
            if v.format == "pytorch"
            else art.file("model.onnx").stat().st_size
        )
        row: dict[str, Any] = {
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
        ids = _agreement_ids(ctx, v.name)
        if ids is not None and reference is not None:
            row["agreement_with_onnx_fp32"] = agreement(ids, reference)
        if v.name in bench:
            b = bench[v.name]
            row |= {
                "ttft_ms": b["ttft_ms"],
                "decode_tokens_per_second": b["decode_tokens_per_second"],
                "decode_tokens_per_second_rounds": b["decode_tokens_per_second_rounds"],
                "peak_rss_bytes": b["peak_rss_bytes"],
                "load_seconds": b["load_seconds"],
            }
        out.append(row)
    pt = next(r for r in out if r["name"] == BASELINE)
    for r in out:
        if "decode_tokens_per_second" in r:
            r["decode_speedup"] = r["decode_tokens_per_second"] / pt["decode_tokens_per_second"]
    return out


def _agreement_ids(ctx: RunContext, name: str) -> list[list[int]] | None:
    art = ctx.artifacts.get(f"llm-evaluate.{name}")
    if art is None or not art.file("agreement.json").is_file():
        return None
    return json.loads(art.file("agreement.json").read_text())


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


def choose(rows: list[dict[str, Any]], recipe: Recipe) -> tuple[str | None, dict[str, str]]:
    """The ONNX variant with the most decode tokens/s among those within every budget."""
    b = recipe.budget
    verdicts: dict[str, str] = {}
    qualified = []
    for r in rows:
        if r["format"] != "onnx":
            verdicts[r["name"]] = "baseline (not shippable: the bundle is ONNX)"
            continue
        reasons = []
        if r["accuracy_drop"] > b.max_accuracy_drop + 1e-9:
            reasons.append(f"accuracy drop {r['accuracy_drop'] * 100:.2f} pts > budget {b.max_accuracy_drop * 100:.2f}")
        if b.min_speedup is not None and r["decode_speedup"] < b.min_speedup:
            reasons.append(f"decode {r['decode_speedup']:.2f}x PyTorch < budget {b.min_speedup:.2f}x")
        if b.max_size_mb is not None and r["size_bytes"] / 1e6 > b.max_size_mb:
            reasons.append(f"{r['size_bytes'] / 1e6:.1f} MB > budget {b.max_size_mb:.1f} MB")
        if reasons:
            verdicts[r["name"]] = "rejected: " + "; ".join(reasons)
        else:
            qualified.append(r)
    if not qualified:
        return None, verdicts
    best = max(qualified, key=lambda r: r["decode_tokens_per_second"])
    for r in qualified:
        verdicts[r["name"]] = "shipped: most decode tokens/s within budget" if r is best else "within budget, slower"
    return best["name"], verdicts


def run_generation(recipe: Recipe, runs_root: Path | None = None, force: tuple[str, ...] = ()) -> RunContext:
    import torch.distributed as dist

    from toolchain.bundle import publish_bundle
    from toolchain.llm import report
    from toolchain.registry import load_all

    if dist.is_available() and dist.is_initialized():
        raise ToolchainError(
            f"recipe '{recipe.name}' is a generation recipe, which trains in one process; run it without torchrun "
            "(make with NPROC=1, the default)"
        )
    load_all()
    ctx = RunContext(recipe, runs_root)
    with run_lock(ctx.run_dir):
        log.info("run %s -> %s", recipe.name, _rel(ctx.run_dir))
        prepare_run_dir(ctx)
        with phase(ctx, "plan"):
            check_disk(ctx)
            calls, variants = plan(recipe, ctx)
        unknown = [f for f in force if f not in {c.key for c in calls} | {c.stage for c in calls} | {"bundle"}]
        if unknown:
            raise ToolchainError(
                f"--force {', '.join(unknown)}: no such stage; stages: {', '.join(c.key for c in calls)}, bundle"
            )
        forced: set[str] = set()
        for call in calls:
            if call.key in force or call.stage in force or forced & set(call.inputs):
                forced.add(call.key)
            run_stage(ctx, call, force=call.key in forced)
        with phase(ctx, "choose"):
            table = rows(ctx, variants)
            shipped, verdicts = choose(table, recipe)
        if shipped is None:
            with phase(ctx, "report"):
                report.write(ctx, table, None, verdicts, None)
            raise StageError("bundle", "no variant meets the recipe's budget:\n" + report.table(table, verdicts))
        source = next(v.source for v in variants if v.name == shipped)
        bundle_call = StageCall(
            "bundle",
            "llm-bundle",
            {"shipped": shipped, "budget": recipe.budget.model_dump(mode="json")},
            tuple(dict.fromkeys(["llm-finetune", source, f"llm-evaluate.{shipped}", "llm-bench"])),
            {"recipe": recipe.model_dump(mode="json")},
        )
        art = run_stage(ctx, bundle_call, force="bundle" in force or bool(forced & set(bundle_call.inputs)))
        with phase(ctx, "publish"):
            bundle_dir = publish_bundle(art, ctx.run_dir / "bundle")
        with phase(ctx, "report"):
            report.write(ctx, table, shipped, verdicts, bundle_dir)
            write_lineage(ctx)
    return ctx


def check_disk(ctx: RunContext) -> None:
    """Fail before any compute when the disk cannot hold the run: about 5 fp32 copies of the model (base, tuned,
    ONNX, quantized) plus the stages' temporaries."""
    from toolchain.models import resolve_source
    from toolchain.resources import GB

    folder = resolve_source(ctx.recipe.model.source, ctx.recipe.model)
    params_bytes = _fp32_bytes(folder)
    need = params_bytes * (3 + len(ctx.recipe.compile.quantize)) + params_bytes  # + a stage's temporary copy
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ctx.run_dir).free
    log.info("expects about %.1f GB of artifacts (%.1f GB free here)", need / GB, free / GB)
    if need > free:
        raise ToolchainError(
            f"{ctx.run_dir}: about {need / GB:.1f} GB are needed and {free / GB:.1f} GB are free; free disk space or "
            "set --runs to a larger disk"
        )
    ctx.resources = {"disk_bytes": need, "disk_free_bytes": free}


def _fp32_bytes(folder: Path) -> int:
    """fp32 bytes of the model's parameters (a GGUF file's tensors counted by their element counts)."""
    from toolchain.models import gguf_file

    name = gguf_file(folder)
    if name is None:
        return 2 * sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # fp16/bf16 weights count double
    from gguf import GGUFReader

    return 4 * sum(int(t.n_elements) for t in GGUFReader(str(folder / name)).tensors)


@register(
    "llm-bundle",
    kind="bundle",
    help="The chosen decoder with its tokenizer, generation settings and manifest (toolchain.runtime.Generator).",
    version=2,  # 2: generation.json records the model's context length (the runtime fits long texts into it)
)
def llm_bundle(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from toolchain.bundle import io_spec
    from toolchain.llm.stages import load_tokenizer, prompt_task, stop_token_ids
    from toolchain.models import source_identity

    recipe = ctx.recipe
    g = recipe.generation
    assert g is not None
    shipped = call.config["shipped"]
    source = next(k for k in call.inputs if k.startswith(("llm-export", "llm-quantize.")))
    shutil.copy2(inputs[source].file("model.onnx"), out / "model.onnx")
    tok_dir = inputs["llm-finetune"].path
    shutil.copy2(tok_dir / "tokenizer.json", out / "tokenizer.json")
    tokenizer = load_tokenizer(tok_dir)
    task = prompt_task(ctx)
    prefix, suffix = task.affixes(tokenizer)
    for text in ctx.eval.texts[:50]:  # the app's prompt must be the one evaluated, byte for byte
        if prefix + g.template.format(text=text) + suffix != task.prompt(tokenizer, text):
            raise StageError("bundle", f"the chat template cannot be split around the prompt for eval text {text!r}")
    metrics = json.loads(inputs[f"llm-evaluate.{shipped}"].file("metrics.json").read_text())
    generation = {
        "template": g.template,
        "prompt_prefix": prefix,
        "prompt_suffix": suffix,
        "labels": recipe.data.labels,
        "max_new_tokens": g.max_new_tokens,
        "stop_strings": list(g.stop_strings),
        "stop_token_ids": stop_token_ids(tokenizer),
        # what the accuracy was measured with: the prompts' shared first tokens (their key/values computed once;
        # a prompt that does not start with them is run whole) and the batch size of Generator.classify_batch
        "prefix_ids": metrics["prefix_ids"],
        "batch_size": metrics["batch_size"],
        # prompt + answer tokens the model takes; Generator.classify cuts a longer text to its first tokens
        "context_length": _context_length(tok_dir),
        "parse": "the label whose word comes first in the answer, whole words, case ignored; none: unparsed",
    }
    (out / "generation.json").write_text(json.dumps(generation, indent=2))
    bench = json.loads(inputs["llm-bench"].file("bench.json").read_text())
    timing = bench["variants"][shipped]
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(out.iterdir())}
    manifest = {
        "format_version": GENERATOR_MANIFEST_VERSION,
        "kind": "generator",
        "name": recipe.name,
        "variant": shipped,
        "model": "model.onnx",
        "tokenizer": "tokenizer.json",
        "generation": "generation.json",
        **io_spec(out / "model.onnx"),
        "kv_cache": "past_key_values.N.key/value in (batch, kv_heads, past, head_dim), present.N.* out; the first "
        "run takes the prompt and empty past tensors, each later run one token and the previous run's present",
        "metrics": {
            "accuracy": metrics["accuracy"],
            "eval_rows": metrics["eval_rows"],
            "eval_file": recipe.data.eval,
            "ttft_ms_p50": timing["ttft_ms"]["p50"],
            "decode_tokens_per_second": timing["decode_tokens_per_second"],
            "peak_rss_bytes": timing["peak_rss_bytes"],
            "size_bytes": files["model.onnx"]["bytes"],
        },
        "target": {
            "provider": "CPUExecutionProvider",
            "threads": bench["threads"],
            "machine": platform.machine(),
            "budget": call.config["budget"],
        },
        "lineage": {
            "recipe": call.identity["recipe"],
            "base_model": source_identity(recipe.model.source, recipe.model),
            "stages": [{"key": r.key, "stage": r.stage, "id": r.id, "config": r.config} for r in ctx.records],
            "versions": ctx.versions,
        },
        "files": files,
        "bundle_bytes": sum(f["bytes"] for f in files.values()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"shipped": shipped, "files": sorted(files), "bundle_bytes": manifest["bundle_bytes"]}


def _context_length(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    value = config.get("max_position_embeddings")
    return int(value) if value else None
