"""Deterministic fault injection at named points: how the tests interrupt a run exactly where they mean to, with the
same signal a user's Ctrl-C, a `kill` or the OOM killer delivers, instead of racing a process from outside.

Inert unless `TOOLCHAIN_FAULT` is set:

    TOOLCHAIN_FAULT=<stage>:<point>:<action>[:rank=<N>][,<another>...]

- stage: a stage key in the plan (`quantize.onnx-int8-dynamic`), a registered stage name (`quantize`), `publish`
  (copying the bundle to runs/<recipe>/bundle) or `*` (any).
- point: where in the stage (see POINTS); `after-checkpoint-N` and `after-step-N` are in the training loop.
- action: `SIGKILL`, `SIGINT` or `SIGTERM` (sent to this very process with os.kill) or `raise` (an InjectedFault, an
  exception the toolchain does not know, as a bug in a library would raise).
- rank: only in that torchrun rank (default: every process that reaches the point).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass

from toolchain.errors import ToolchainError

ENV = "TOOLCHAIN_FAULT"

POINTS = {
    "start": "the stage's temporary folder exists and is empty; its function has not run",
    "mid-stage": "the stage function has returned: its files are in the temporary folder, artifact.json is not",
    "before-rename": "artifact.json is written in the temporary folder, which is not yet renamed into place",
    "after-rename": "the artifact is in place; its spent checkpoints are not yet removed",
    "after-checkpoint-N": "the training loop has just written its N-th checkpoint",
    "after-step-N": "the training loop has just finished optimizer step N",
    "child": "a measuring process of bench or llm-bench has started (it has loaded nothing yet)",
}
ACTIONS = ("SIGKILL", "SIGINT", "SIGTERM", "raise")

log = logging.getLogger("toolchain")


class InjectedFault(RuntimeError):
    """Raised by the `raise` action: an exception the toolchain does not expect."""


@dataclass(frozen=True)
class Fault:
    stage: str
    point: str
    action: str
    rank: int | None = None

    def matches(self, key: str, stage: str, point: str, rank: int) -> bool:
        return self.stage in ("*", key, stage) and self.point == point and (self.rank is None or self.rank == rank)


_POINT = re.compile(r"^(start|mid-stage|before-rename|after-rename|child|after-checkpoint-\d+|after-step-\d+)$")


def parse(spec: str) -> list[Fault]:
    """The faults a TOOLCHAIN_FAULT value names; a malformed value is an error naming the part and the grammar."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        rank = None
        if len(fields) == 4 and fields[3].startswith("rank="):
            rank_text = fields.pop()[5:]
            if not rank_text.isdigit():
                raise ToolchainError(f"{ENV}: '{part}': rank=N takes a number")
            rank = int(rank_text)
        if len(fields) != 3 or not _POINT.match(fields[1]) or fields[2] not in ACTIONS:
            raise ToolchainError(
                f"{ENV}: '{part}' is not <stage>:<point>:<action>[:rank=N]; points: {', '.join(POINTS)}; "
                f"actions: {', '.join(ACTIONS)}"
            )
        faults.append(Fault(fields[0], fields[1], fields[2], rank))
    return faults


def point(key: str, stage: str, name: str) -> None:
    """Fire the fault TOOLCHAIN_FAULT names for stage `key` (registered as `stage`) at point `name`, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    for fault in parse(spec):
        if fault.matches(key, stage, name, rank):
            log.warning("fault injected: %s in stage %s at %s (%s)", fault.action, key, name, ENV)
            if fault.action == "raise":
                raise InjectedFault(f"fault injected by {ENV} in stage {key} at {name}")
            # A signal to this very process: the handler (Python's for SIGINT, the CLI's for SIGTERM) runs before
            # the next bytecode, so the interruption lands exactly here; SIGKILL ends the process at once.
            os.kill(os.getpid(), getattr(signal, fault.action))


_current: tuple[str, str] | None = None  # (key, stage) of the stage running in this process


@contextlib.contextmanager
def in_stage(key: str, stage: str) -> Iterator[None]:
    """Name the running stage, for points reached in code that does not know it (the training loop)."""
    global _current
    before, _current = _current, (key, stage)
    try:
        yield
    finally:
        _current = before


def here(name: str) -> None:
    """`point` for the stage running now (nothing outside a stage)."""
    if _current is not None and os.environ.get(ENV):
        point(*_current, name)
