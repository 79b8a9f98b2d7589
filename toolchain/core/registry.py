"""The one stage registry: stage names used in plans and lineage -> the function that runs the stage. Stage modules
register themselves when imported; `toolchain.engine.load_all` imports every task, and each task its stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolchain.core.artifact import Artifact, StageCall
    from toolchain.core.context import RunContext

# A stage reads its inputs (artifacts of earlier stages), writes files into `out` (an empty temporary folder that
# becomes the artifact once the function returns), and returns a JSON-able dict of facts for the lineage.
StageFn = Callable[["RunContext", "StageCall", "dict[str, Artifact]", Path], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # what its artifact is: hf-model, onnx, metrics, bench, bundle
    fn: StageFn
    help: str
    version: int  # bump when the stage's output changes for the same inputs: invalidates cached artifacts


STAGES: dict[str, Stage] = {}


def register(name: str, kind: str, help: str, version: int = 1) -> Callable[[StageFn], StageFn]:
    def wrap(fn: StageFn) -> StageFn:
        if name in STAGES:
            raise RuntimeError(f"stage {name!r} registered twice")
        STAGES[name] = Stage(name=name, kind=kind, fn=fn, help=help, version=version)
        return fn

    return wrap
