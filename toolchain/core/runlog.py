"""One log file per run, `runs/<recipe>/logs/<UTC time>-<pid>[-rank<N>].log`: the run's whole console output (what
it prints, its progress bars, library warnings), every toolchain log record down to DEBUG (the console shows INFO),
the tails of child processes that failed, and the traceback of any failure, which the console shows as one line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from toolchain.errors import ToolchainError, last_line

_file: TextIO | None = None
_path: Path | None = None


class _Tee(io.TextIOBase):
    """Writes to the console stream and the log file alike; looks like the console to whoever asks (tqdm)."""

    def __init__(self, console: TextIO, file: TextIO):
        self.console = console
        self.file = file

    # A library that made its log handler while the run was capturing (transformers makes its handler on first
    # use, with sys.stderr as it is then) keeps writing here after the run: a closed file is skipped, not an error.
    def write(self, s: str) -> int:
        for stream in (self.console, self.file):
            with contextlib.suppress(ValueError):
                stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in (self.console, self.file):
            with contextlib.suppress(ValueError):
                stream.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.console, "encoding", "utf-8")


@contextlib.contextmanager
def capture(run_dir: Path, argv: list[str] | None = None) -> Iterator[Path]:
    """Copy this process's console output and log records into a new log file under `run_dir/logs/`."""
    global _file, _path
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = logs / f"{stamp}-{os.getpid()}{'' if rank == '0' else f'-rank{rank}'}.log"
    f = path.open("a", encoding="utf-8", errors="replace", buffering=1)
    f.write(f"# {shlex.join([sys.executable, '-m', 'toolchain', *(argv or sys.argv[1:])])}\n# cwd {os.getcwd()}\n")
    handler = logging.StreamHandler(f)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
    before = (_file, _path)
    _file, _path = f, path
    try:
        yield path
    finally:
        sys.stdout, sys.stderr = out, err
        root.removeHandler(handler)
        _file, _path = before
        f.close()


def current() -> Path | None:
    """The log file of the run in progress in this process, if any."""
    return _path


def where() -> str:
    """How to point a user at the full log: its path, relative to the working folder when it is below it."""
    if _path is None:
        return "the output above"
    with contextlib.suppress(ValueError):
        return str(_path.relative_to(Path.cwd()))
    return str(_path)


def to_file(text: str) -> None:
    """Write `text` into the run's log file only (not the console): tracebacks, child processes' output."""
    if _file is not None:
        _file.write(text if text.endswith("\n") else text + "\n")


def traceback_to_file(error: BaseException) -> None:
    to_file("".join(traceback.format_exception(type(error), error, error.__traceback__)))


def write_crash_log(error: BaseException, folder: Path, command: str) -> Path:
    """The traceback of a failure outside any run (validate, report, gate...), in a file of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return path


def child_failed(stage: str, what: str, returncode: int, output: str) -> ToolchainError:
    """The error for a child process that failed: one line, its output's tail kept in the run's log (exit code 1:
    not a check that failed, a process that broke)."""
    to_file(f"--- {what}: exit code {returncode}; the end of its output:\n{output[-20000:]}\n---")
    how = f"exit code {returncode}" if returncode >= 0 else f"killed by signal {-returncode}"
    return ToolchainError(
        f"stage {stage} failed: {what} failed in its process ({how}): {last_line(output)}; its output is in {where()}"
    )


def mark_failure(rank: int, line: str, code: int) -> None:
    """Beside the log, `<log>.failed`: when this rank failed and why, so the launcher can tell which rank failed
    first (the others fail because it did: a closed connection, the launcher's SIGTERM)."""
    if _path is not None:
        data = {"rank": rank, "ns": time.time_ns(), "error": line, "exit_code": code}
        _path.with_suffix(".failed").write_text(json.dumps(data))


def first_failure(logs: Path, since_ns: int) -> dict[str, Any] | None:
    """The earliest failure marked under `logs` since `since_ns` (see mark_failure)."""
    found = []
    for p in logs.glob("*.failed"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(p.read_text())
            if data["ns"] >= since_ns:
                found.append(data)
    return min(found, key=lambda d: d["ns"]) if found else None
