"""The one stage registry: stage names used in plans and lineage -> the function that runs the stage and the typed
config it reads. Stage modules register themselves when imported; `toolchain.engine.load_all` imports every task,
and each task its stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from toolchain.core.artifact import UNHASHED_SETTINGS
from toolchain.errors import ToolchainError

if TYPE_CHECKING:
    from toolchain.core.artifact import Artifact, StageCall
    from toolchain.core.context import StageContext

# A stage reads its typed config (ctx.config), its inputs (artifacts of earlier stages) and the data splits its id
# covers; it writes files into `out` (an empty temporary folder that becomes the artifact once the function returns)
# and returns a JSON-able dict of facts for the lineage.
StageFn = Callable[["StageContext", "StageCall", "dict[str, Artifact]", Path], dict[str, Any]]


class StageConfig(BaseModel):
    """Base of a stage's typed config. It is validated from what the stage's id hashes (the call's identity, then its
    config, which wins) and its unhashed settings; keys a stage does not declare are ignored, so a stage can only
    read what is hashed or named in `UNHASHED_SETTINGS`."""

    model_config = ConfigDict(extra="ignore", frozen=True)


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # what its artifact is: hf-model, onnx, metrics, bench, bundle
    fn: StageFn
    help: str
    version: int  # bump when the stage's output changes for the same inputs: invalidates cached artifacts
    config: type[BaseModel] = StageConfig


STAGES: dict[str, Stage] = {}


def register(
    name: str, kind: str, help: str, version: int = 1, config: type[BaseModel] = StageConfig
) -> Callable[[StageFn], StageFn]:
    def wrap(fn: StageFn) -> StageFn:
        if name in STAGES:
            raise RuntimeError(f"stage {name!r} registered twice")
        STAGES[name] = Stage(name=name, kind=kind, fn=fn, help=help, version=version, config=config)
        return fn

    return wrap


def typed_config(call: StageCall) -> BaseModel:
    """The call's config as its stage's typed config; a plan that builds one its stage cannot read fails here,
    before any stage runs."""
    unknown = set(call.settings) - set(UNHASHED_SETTINGS)
    if unknown:
        raise ToolchainError(f"stage {call.key}: settings {sorted(unknown)} would not be in its id; put them in config")
    try:
        return STAGES[call.stage].config.model_validate({**call.identity, **call.config, **call.settings})
    except ValidationError as e:
        raise ToolchainError(f"stage {call.key}: the plan's config does not fit the stage's: {e}") from e
