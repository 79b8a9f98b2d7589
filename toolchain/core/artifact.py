"""The records the store and the engine pass around: an artifact (what a stage produced), a stage call (one use of a
registered stage in a plan) and a stage record (how a stage went in this run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Artifact:
    """What a stage produced: a folder of files, identified by the hash of everything that made it."""

    key: str
    stage: str
    kind: str
    id: str
    path: Path
    meta: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class StageCall:
    """One use of a registered stage in a plan: its key in the run, config, upstream keys and extra identity."""

    key: str
    stage: str
    config: dict[str, Any]
    inputs: tuple[str, ...] = ()
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    """How a stage went in this run (for the lineage and the log)."""

    key: str
    stage: str
    id: str
    status: str  # ran | reused | rebuilt
    seconds: float
    path: str
    config: dict[str, Any]
    inputs: dict[str, str]
    meta: dict[str, Any]
