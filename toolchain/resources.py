"""What a recipe will need: disk for its artifacts and memory for training, estimated up front from the model's
weight size and the recipe, and checked against this machine before any compute.

The estimate is coarse on purpose and errs high (sst2-minilm: 1.9 GB expected; its run folder holds 1.2 GB after
several configurations' artifacts): S is the fp32 weight
file's size, and every artifact is a multiple of it (fine-tuned model S, export S, fused S, an int8 graph 0.3 S, int4
0.2 S, fp16 0.5 S, Optimum's reference path 2.3 S, a training checkpoint 3 S for full fine-tuning (weights and two
Adam moments) and two of them while the newer one is written, the bundle's forms and its published copy). Memory for
training is the weights, gradients and Adam moments of what trains, plus activations for one batch, plus about 1.5 GB
for the interpreter and libraries.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError
from toolchain.recipe.schema import Recipe

log = logging.getLogger("toolchain")

GB = 1024**3
QUANTIZED = {"dynamic-int8": 0.3, "static-int8": 0.3, "qat-qdq": 0.3, "int4": 0.2, "fp16": 0.5, "nncf-int8": 0.3}
RUNTIME_BYTES = 1.5 * GB
MARGIN = 1.2


class ResourceError(ToolchainError):
    """This machine cannot hold what the recipe will write; found before any compute."""

    exit_code = 2


def _model_facts(folder: Path) -> tuple[int, dict[str, Any]]:
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    return weights, config if isinstance(config, dict) else {}


def estimate(recipe: Recipe, model_folder: Path) -> dict[str, Any]:
    """Expected disk bytes (by part) and training memory bytes for a recipe."""
    s, config = _model_facts(model_folder)
    ft, comp = recipe.finetune, recipe.compile
    full = ft.method in ("full", "qat")
    trainable = 1.0 if full else 0.05
    parts: dict[str, float] = {"finetune": s * (2 if ft.method == "qat" else 1)}
    if ft.checkpoint_every:
        parts["checkpoints (while training)"] = 2 * 3 * s * trainable
    if comp.distill is not None:
        layers = config.get("num_hidden_layers") or 6
        student = s * max(len(comp.distill.kept_layers(layers)) / layers, 0.3)  # the embeddings stay whole
        parts["distill"] = student + (2 * 3 * student if comp.distill.checkpoint_every else 0)
    exported = min(parts.get("distill", s), s)
    parts["export"] = exported
    if comp.optimize:
        parts["optimize"] = exported
    parts["quantize"] = sum(QUANTIZED[q.mode] * exported for q in comp.quantize)
    if recipe.bench.optimum_baseline:
        parts["optimum-baseline"] = 2.3 * s
    if recipe.bench.openvino_peers:
        parts["openvino-nncf-baseline"] = 0.3 * exported
    forms = 1 + int(recipe.bundle.ort_format) + int(recipe.bundle.tokenizer == "in-graph")
    parts["bundle (artifact and published copy)"] = 2 * forms * exported
    disk = MARGIN * sum(parts.values())

    hidden = config.get("hidden_size", 768)
    layers = config.get("num_hidden_layers", 12)
    inter = config.get("intermediate_size", 4 * hidden)
    heads = config.get("num_attention_heads", 12)
    tokens = ft.batch_size * ft.max_length
    per_layer = tokens * (10 * hidden + 2 * inter) + ft.batch_size * heads * ft.max_length**2 * 2
    activations = 4 * layers * per_layer
    memory = RUNTIME_BYTES + s + 3 * s * trainable + activations
    return {"disk_bytes": int(disk), "disk_parts": {k: int(v) for k, v in parts.items()}, "memory_bytes": int(memory)}


def _existing_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check(recipe: Recipe, model_folder: Path, run_dir: Path) -> dict[str, Any]:
    """The estimate, the machine's free disk and memory; ResourceError when the disk cannot hold what is still to
    be written (the estimate less what the run folder already holds)."""
    import psutil

    need = estimate(recipe, model_folder)
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    have = _existing_bytes(run_dir / "stages")
    still = max(0, need["disk_bytes"] - have)
    memory = psutil.virtual_memory().total
    facts = {**need, "disk_free_bytes": free, "run_folder_bytes": have, "memory_total_bytes": memory}
    if still > free:
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in need["disk_parts"].items() if v)
        raise ResourceError(
            f"{run_dir}: this recipe needs about {still / GB:.1f} GB more disk for its artifacts "
            f"(estimate {need['disk_bytes'] / GB:.1f} GB: {parts} GB; {have / GB:.1f} GB already there) and "
            f"{probe} has {free / GB:.1f} GB free. Free space, run with --runs on a larger disk, or drop variants "
            "(compile.quantize, bench.optimum_baseline, bundle.ort_format)"
        )
    return facts


def announce(facts: dict[str, Any]) -> None:
    """Log what `check` found: the disk and memory expected, and a warning when training may not fit in memory."""
    log.info(
        "expects about %.1f GB of artifacts (%.1f GB free here) and %.1f GB of memory to train (%.1f GB here)",
        facts["disk_bytes"] / GB,
        facts["disk_free_bytes"] / GB,
        facts["memory_bytes"] / GB,
        facts["memory_total_bytes"] / GB,
    )
    if facts["memory_bytes"] > facts["memory_total_bytes"]:
        log.warning(
            "training may not fit in memory (about %.1f GB expected, %.1f GB here): lower finetune.batch_size or "
            "finetune.max_length, or use method lora/qlora",
            facts["memory_bytes"] / GB,
            facts["memory_total_bytes"] / GB,
        )


def expect(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """What a task's `expect_resources` does: check the recipe's disk and memory needs against this machine (a
    ResourceError before any compute when they do not fit) and say them in the log."""
    from toolchain.models import resolve_source

    facts = check(recipe, resolve_source(recipe.model.source, recipe.model), run_dir)
    announce(facts)
    return facts
