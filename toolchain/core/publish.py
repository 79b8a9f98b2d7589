"""Copying a run's bundle into place (`runs/<recipe>/bundle`) by two renames, and undoing a copy a kill interrupted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from toolchain.core import faults
from toolchain.runtime import sha256_file

if TYPE_CHECKING:
    from toolchain.core.artifact import Artifact


def publish_bundle(art: Artifact, dest: Path) -> Path:
    """Copy the bundle artifact to `dest` (runs/<recipe>/bundle) atomically, unless it is already there intact."""
    manifest = art.file("manifest.json")
    current = dest / "manifest.json"
    if current.is_file() and current.read_bytes() == manifest.read_bytes() and _intact(dest):
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(art.path, tmp, ignore=shutil.ignore_patterns("artifact.json"))
        faults.point("publish", "publish", "mid-stage")
        if dest.exists():
            os.replace(dest, old)
        # A kill between these two renames leaves no `dest` and the previous bundle as `.bundle.old-*`:
        # recover_bundle puts it back at the next run, before anything else.
        faults.point("publish", "publish", "before-rename")
        os.replace(tmp, dest)
    except BaseException:  # an exception or Ctrl-C: the previous bundle stays where it was
        if not dest.exists() and old.exists():
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest


def recover_bundle(dest: Path) -> list[str]:
    """Undo what an interrupted publish_bundle left (called with the run lock held): a previous bundle moved aside
    goes back into place when `dest` is missing, and the half-copied and moved-aside folders are removed."""
    notes = []
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"))
    if not dest.exists() and olds:
        os.replace(olds[-1], dest)
        notes.append(f"{olds[-1].name} put back as {dest.name}")
        olds = olds[:-1]
    for p in [*olds, *dest.parent.glob(f".{dest.name}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"{p.name} removed")
    return notes


def _intact(folder: Path) -> bool:
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        p = folder / name
        if not p.is_file() or sha256_file(p) != info["sha256"]:
            return False
    return True
