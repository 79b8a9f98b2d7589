"""What stages share during one run: the recipe, its run folder, the data splits, the library versions and threads
their ids are computed under, and the artifacts built so far."""

from __future__ import annotations

import importlib.metadata
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.core.provenance import cpu_flags, cpu_preset
from toolchain.data import Split, load_splits, load_validation
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.schema import Recipe

if TYPE_CHECKING:
    from toolchain.core.artifact import Artifact, StageRecord

LIBRARIES = (
    "toolchain",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "peft",
    "tokenizers",
    "numpy",
)


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        dist = "edge-toolchain" if name == "toolchain" else name
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class RunContext:
    """What stages share during one run: the recipe, its run folder, the data splits, thread settings."""

    def __init__(
        self,
        recipe: Recipe,
        runs_root: Path | None = None,
        *,
        versions: dict[str, str] | None = None,
        threads: int | None = None,
        cpu_preset: str | None = None,
    ):
        """`versions`, `threads` and `cpu_preset` stand in for this machine's (to recompute ids made elsewhere)."""
        self.recipe = recipe
        self.run_dir = (runs_root or PROJECT_ROOT / "runs") / recipe.name
        self.stages_dir = self.run_dir / "stages"
        self.versions = versions or library_versions()
        self._threads = threads
        self._cpu_preset = cpu_preset
        self.records: list[StageRecord] = []
        self.artifacts: dict[str, Artifact] = {}
        self.checkpoint_dir: Path | None = None  # the running stage's folder for resumable checkpoints
        self.resources: dict[str, Any] = {}  # expected disk/memory and what this machine has (resources.check)

    @cached_property
    def splits(self) -> tuple[Split, Split]:
        return load_splits(self.recipe)

    @property
    def train(self) -> Split:
        return self.splits[0]

    @property
    def eval(self) -> Split:
        return self.splits[1]

    @cached_property
    def validation(self) -> Split | None:
        return load_validation(self.recipe)

    @property
    def threads(self) -> int:
        return self.recipe.bench.threads or self._threads or default_threads()

    @cached_property
    def cpu_preset(self) -> str:
        """The ORTQuantizer preset this CPU gets (Optimum's baseline is built with it)."""
        return self._cpu_preset or cpu_preset(cpu_flags())


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
