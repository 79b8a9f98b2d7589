"""The one registry: stage names used in plans and lineage -> the function that runs the stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolchain.pipeline import Artifact, RunContext, StageCall

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


def load_all() -> dict[str, Stage]:
    """Import every stage module so that the registry is complete."""
    from toolchain import bundle  # noqa: F401
    from toolchain.compile import distill, export, optimize, optimum_baseline, quantize  # noqa: F401
    from toolchain.evaluate import accuracy, latency  # noqa: F401
    from toolchain.finetune import stage  # noqa: F401
    from toolchain.llm import run, stages  # noqa: F401

    return STAGES
