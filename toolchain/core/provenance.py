"""Where numbers were measured: the machine (CPU model and flags, cores, memory), the software, the git commit.
Light to import (no torch): the bench scripts and the timing children use it too."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any


def environment(threads: int, versions: dict[str, str]) -> dict[str, Any]:
    import psutil

    cpu_model, flags = platform.processor() or "unknown", []
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "", platform.machine()):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(
                    have & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"}
                )
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "threads": threads,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> str:
    """The machine in a few words, for a table's heading: 'Intel(R) Xeon(R) Processor, 2 cores, 23.5 GB'."""
    env = environment(0, {})
    full = env["git_commit"] or "?"
    commit = full[:12] + ("+dirty" if full.endswith("+dirty") else "")
    return f"{env['cpu_model']}, {env['cores_logical']} cores, {env['memory_gb']} GB, commit `{commit}`"


def cpu_preset(flags: set[str], machine: str | None = None) -> str:
    """The AutoQuantizationConfig preset an Optimum user picks for this CPU."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def native_bf16() -> bool:
    """Whether training here runs bf16 in hardware: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16 (elsewhere
    autocast emulates it: measured 18x slower than fp32 for MiniLM on an AVX2 CPU)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision: str, bf16_native: bool | None = None) -> str:
    """A training precision with `auto` resolved: bf16 where it is native, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if (native_bf16() if bf16_native is None else bf16_native) else "fp32"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
