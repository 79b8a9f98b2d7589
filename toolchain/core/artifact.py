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
    """One use of a registered stage in a plan: its key in the run, config, upstream keys, extra identity (content
    hashes and facts of the data and the source) and settings. The id hashes config, inputs and identity; `settings`
    are the few that cannot change what the stage writes (`UNHASHED_SETTINGS`) and are not hashed."""

    key: str
    stage: str
    config: dict[str, Any]
    inputs: tuple[str, ...] = ()
    identity: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


# Settings a stage may read that its id does not hash, each with why it cannot change the stage's output.
UNHASHED_SETTINGS = {
    "checkpoint_every": "how often training saves a resumable checkpoint; a resumed run ends with the same weights",
    "access": "where the model source is and what loading it may do (pickles, remote code): a load either succeeds "
    "with the files the id hashes or fails",
}


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
