"""What stages share during one run: the recipe, its run folder, the data splits, the library versions and threads
their ids are computed under, and the artifacts built so far."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from toolchain.core.provenance import cpu_flags, cpu_preset, native_bf16, resolve_precision
from toolchain.data import Split, load_splits, load_test, load_validation
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.schema import NOT_IN_STAGE_ID, Recipe, TrainingSettings

if TYPE_CHECKING:
    from toolchain.core.artifact import Artifact, StageCall, StageRecord

C = TypeVar("C", bound=BaseModel)
log = logging.getLogger("toolchain")

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
        bf16_native: bool | None = None,
    ):
        """`versions`, `threads`, `cpu_preset` and `bf16_native` stand in for this machine's (to recompute ids made
        elsewhere)."""
        self.recipe = recipe
        self.run_dir = (runs_root or PROJECT_ROOT / "runs") / recipe.name
        self.stages_dir = self.run_dir / "stages"
        self.versions = versions or library_versions()
        self._threads = threads
        self._cpu_preset = cpu_preset
        self._bf16_native = bf16_native
        self.records: list[StageRecord] = []
        self.artifacts: dict[str, Artifact] = {}
        self.checkpoint_dir: Path | None = None  # the running stage's folder for resumable checkpoints
        self.resources: dict[str, Any] = {}  # expected disk/memory and what this machine has (resources.check)
        self.skipped: dict[str, str] = {}  # rows the plan leaves out, with why (a peer whose tool cannot be built)

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

    @cached_property
    def test(self) -> Split | None:
        return load_test(self.recipe)

    @property
    def threads(self) -> int:
        return self.recipe.bench.threads or self._threads or default_threads()

    @cached_property
    def cpu_preset(self) -> str:
        """The ORTQuantizer preset this CPU gets (Optimum's baseline is built with it)."""
        return self._cpu_preset or cpu_preset(cpu_flags())

    @cached_property
    def bf16_native(self) -> bool:
        """Whether training here runs bf16 in hardware (what `precision: auto` resolves by)."""
        return self._bf16_native if self._bf16_native is not None else native_bf16()

    def training_config(self, section: TrainingSettings) -> dict[str, Any]:
        """A training section as its stage gets it (and hashes it): `precision: auto` resolved for this machine."""
        cfg = section.model_dump(mode="json", exclude=NOT_IN_STAGE_ID)
        if cfg["precision"] == "bf16" and not self.bf16_native and self._bf16_native is None:
            log.warning(
                "precision bf16 on a machine without native bf16 (AMX, AVX512-BF16 or a CUDA GPU): autocast emulates "
                "it, measured 18x slower than fp32 on an AVX2 CPU; `precision: auto` picks fp32 here"
            )
        cfg["precision"] = resolve_precision(cfg["precision"], self.bf16_native)
        return cfg


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


# The identity key that must be in a stage's id for the stage to read each split.
SPLIT_COVERED_BY = {
    "train": "train_sha256",
    "eval": "eval_sha256",
    "validation": "validation_sha256",
    "test": "test_sha256",
}


class StageContext:
    """What a running stage reads besides its inputs: its typed config, the data splits its id covers, the thread
    count, the folder for resumable checkpoints, and (for a bundle's lineage) the stages run so far. There is no
    recipe here: whatever a stage reads is in its config or identity, which its id hashes, or in
    `UNHASHED_SETTINGS`; reading a split or a data file the id does not cover is an error, not a stale reuse."""

    def __init__(self, run: RunContext, call: StageCall, config: BaseModel):
        self._run = run
        self.call = call
        self._config = config

    def config(self, kind: type[C]) -> C:
        """The stage's typed config (validated by the engine from what the id hashes)."""
        if not isinstance(self._config, kind):
            have = type(self._config).__name__
            raise TypeError(f"stage {self.call.key}: its config is a {have}, not a {kind.__name__}")
        return self._config

    def _covered(self, what: str, key: str) -> None:
        if key not in self.call.identity:
            raise RuntimeError(
                f"stage {self.call.key} reads {what}, but its id does not cover it: add {key!r} to its identity"
            )

    @property
    def train(self) -> Split:
        self._covered("the train split", SPLIT_COVERED_BY["train"])
        return self._run.train

    @property
    def eval(self) -> Split:
        self._covered("the eval split", SPLIT_COVERED_BY["eval"])
        return self._run.eval

    @property
    def validation(self) -> Split | None:
        self._covered("the validation split", SPLIT_COVERED_BY["validation"])
        return self._run.validation

    @property
    def test(self) -> Split | None:
        self._covered("the test split", SPLIT_COVERED_BY["test"])
        return self._run.test

    def data_file(self, rel: str, sha256: str) -> Path:
        """A file under the data root whose content hash (`sha256`) the stage's id holds; it must still have it."""
        from toolchain.runtime import sha256_file

        path = self._run.recipe.data_root() / rel
        if sha256_file(path) != sha256:
            raise RuntimeError(f"stage {self.call.key}: {path} changed after the run was planned; run it again")
        return path

    @property
    def threads(self) -> int:
        return self._run.threads

    @property
    def checkpoint_dir(self) -> Path | None:
        return self._run.checkpoint_dir

    @property
    def records(self) -> list[StageRecord]:
        return self._run.records

    @property
    def versions(self) -> dict[str, str]:
        return self._run.versions
