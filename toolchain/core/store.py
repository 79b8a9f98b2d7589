"""Content-addressed artifacts: a stage's id is a hash of (stage name and version, its config, its inputs' ids, what
else it reads, library versions). Its artifact lives in `runs/<recipe>/stages/<key>-<id>/` and is complete only when
`artifact.json` (written last, with the sha256 of every file) is there and the files still match it. A complete
artifact is reused; anything else is rebuilt in a temporary folder that is renamed into place, so an interrupted
stage never leaves a half artifact that looks whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.core import faults
from toolchain.core.artifact import Artifact, StageCall, StageRecord
from toolchain.core.context import StageContext
from toolchain.core.publish import recover_bundle
from toolchain.core.registry import STAGES, typed_config
from toolchain.errors import ToolchainError, UnexpectedError
from toolchain.paths import PROJECT_ROOT
from toolchain.runtime import sha256_file

if TYPE_CHECKING:
    from toolchain.core.context import RunContext

log = logging.getLogger("toolchain")


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path (artifact.json itself excluded)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "artifact.json"
    }


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_id(call: StageCall, input_ids: dict[str, str], versions: dict[str, str]) -> str:
    stage = STAGES[call.stage]
    payload = {
        "stage": call.stage,
        "stage_version": stage.version,
        "config": call.config,
        "inputs": input_ids,
        "identity": call.identity,
        "versions": versions,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def is_complete(folder: Path, sid: str) -> tuple[bool, str]:
    """Is `folder` a whole artifact with id `sid`? Returns (ok, why not)."""
    record = folder / "artifact.json"
    if not record.is_file():
        return False, "absent"
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False, "its artifact.json is unreadable"
    if data.get("id") != sid:
        return False, "its id does not match"
    files = data.get("files", {})
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            return False, f"{rel} is missing"
        if sha256_file(p) != digest:
            return False, f"{rel} no longer matches its recorded sha256"
    return True, ""


def run_stage(ctx: RunContext, call: StageCall, force: bool = False) -> Artifact:
    """Reuse the stage's artifact if it is complete, else build it atomically."""
    stage = STAGES[call.stage]
    inputs = {k: ctx.artifacts[k] for k in call.inputs}
    input_ids = {k: a.id for k, a in inputs.items()}
    sid = stage_id(call, input_ids, ctx.versions)
    folder = ctx.stages_dir / f"{call.key}-{sid[:12]}"
    ok, why = is_complete(folder, sid)
    t0 = time.perf_counter()
    if ok and not force:
        meta = json.loads((folder / "artifact.json").read_text())["meta"]
        status = "reused"
    else:
        if why not in ("absent", "") and not force:
            log.warning("stage %s: cached artifact %s is damaged (%s); rebuilding it", call.key, folder, why)
        status = "rebuilt" if why not in ("absent", "") or force else "ran"
        log.info("stage %s: running -> %s", call.key, rel_path(folder))
        with phase(ctx, call.key):
            meta = _build(ctx, call, stage.fn, inputs, folder, sid, input_ids)
    seconds = time.perf_counter() - t0
    art = Artifact(call.key, call.stage, stage.kind, sid, folder, meta)
    ctx.artifacts[call.key] = art
    ctx.records.append(
        StageRecord(
            call.key, call.stage, sid, status, round(seconds, 3), rel_path(folder), call.config, input_ids, meta
        )
    )
    verb = "reused" if status == "reused" else "done"
    log.info("stage %-28s %s in %s -> %s", call.key, verb, _fmt_seconds(seconds), rel_path(folder))
    return art


def _build(
    ctx: RunContext,
    call: StageCall,
    fn: Any,
    inputs: dict[str, Artifact],
    folder: Path,
    sid: str,
    input_ids: dict[str, str],
) -> dict[str, Any]:
    ctx.stages_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.stages_dir / f".tmp-{call.key}-{sid[:12]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx.checkpoint_dir = checkpoint_dir(ctx, call.key, sid)
    try:
        with faults.in_stage(call.key, call.stage):
            faults.point(call.key, call.stage, "start")
            meta = fn(StageContext(ctx, call, typed_config(call)), call, inputs, tmp) or {}
            faults.point(call.key, call.stage, "mid-stage")
        record = {
            "id": sid,
            "key": call.key,
            "stage": call.stage,
            "config": call.config,
            "inputs": input_ids,
            "identity": call.identity,
            "versions": ctx.versions,
            "meta": meta,
            "files": hash_tree(tmp),
        }
        (tmp / "artifact.json").write_text(json.dumps(record, indent=2, default=str))
        faults.point(call.key, call.stage, "before-rename")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        faults.point(call.key, call.stage, "after-rename")
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # the artifact is whole: its checkpoints are spent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ctx.checkpoint_dir = None
    return meta


def kept(ctx: RunContext) -> str:
    """What an interrupted or failed run leaves for the next one, in words."""
    done = [r.key for r in ctx.records]
    if not done:
        return "no stage was complete yet"
    names = ", ".join(done) if len(done) <= 6 else f"{', '.join(done[:4])} and {len(done) - 4} more"
    verb = "is" if len(done) == 1 else "are"
    return f"{names} {verb} complete and will be reused"


@contextlib.contextmanager
def phase(ctx: RunContext, name: str) -> Iterator[None]:
    """Run a stage or a step of the engine (plan, report); an exception that is not the toolchain's own comes out
    as an UnexpectedError naming `name` and what was kept (the traceback stays attached as its cause)."""
    try:
        yield
    except ToolchainError:
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the CLI says what the next run reuses
        if not hasattr(e, "toolchain_kept"):
            e.toolchain_kept = kept(ctx)  # type: ignore[attr-defined]
        raise
    except Exception as e:
        raise UnexpectedError(name, e, kept(ctx)) from e


def prepare_run_dir(ctx: RunContext) -> None:
    """With the run lock held: remove what an interrupted run left half-written, put back a bundle it moved aside."""
    stale = remove_stale_temporaries(ctx.stages_dir)
    if stale:
        log.info("removed %d half-written folder(s) an interrupted run left: %s", len(stale), ", ".join(stale))
    notes = recover_bundle(ctx.run_dir / "bundle")
    if notes:
        log.info("an interrupted bundle copy was undone: %s", "; ".join(notes))


def checkpoint_dir(ctx: RunContext, key: str, sid: str) -> Path:
    """Where a stage run keeps resumable checkpoints: keyed by its id, so only the same configuration resumes them;
    kept across interruptions and removed once the artifact is complete."""
    return ctx.stages_dir / ".checkpoints" / f"{key}-{sid[:12]}"


def remove_stale_temporaries(stages_dir: Path) -> list[str]:
    """Delete the half-written stage folders an interrupted or killed run left behind (`.tmp-*`). Called with the
    run lock held, so no live run owns them. Checkpoints are kept: they are how a stage resumes."""
    removed = []
    if stages_dir.is_dir():
        for p in stages_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def rel_path(p: Path) -> str:
    try:
        return str(p.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"
