"""The one manifest writer: every bundle's manifest.json lists each file with its sha256 and size (what
`core.publish` and the runtimes check), the target it was measured for and the lineage of the stages that made it;
a task adds what its apps need (inputs, preprocessing, generation settings, metrics)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.runtime import sha256_file

if TYPE_CHECKING:
    from toolchain.core.artifact import StageCall
    from toolchain.core.context import StageContext


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and bytes of every file in the bundle folder, by name."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}


def target(threads: int, budget: dict[str, Any], runtime: str = "onnxruntime") -> dict[str, Any]:
    """What the bundle was measured for: the runtime on the CPU, the threads, the machine, the budget."""
    provider = "CPUExecutionProvider" if runtime == "onnxruntime" else "CPU"
    return {
        "runtime": runtime,
        "provider": provider,
        "threads": threads,
        "machine": platform.machine(),
        "budget": budget,
    }


def lineage(ctx: StageContext, call: StageCall, base_model: dict[str, Any]) -> dict[str, Any]:
    """The recipe as run, the base model's identity, every stage of this run (key, id, config), library versions."""
    return {
        "recipe": call.identity["recipe"],
        "base_model": base_model,
        "stages": [{"key": r.key, "stage": r.stage, "id": r.id, "config": r.config} for r in ctx.records],
        "versions": ctx.versions,
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json (it must hold `files`, from file_table, taken before it is written)."""
    if "files" not in manifest:
        raise ValueError("a bundle manifest lists its files (core.manifest.file_table)")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
