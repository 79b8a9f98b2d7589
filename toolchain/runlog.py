"""One log file per run, `runs/<recipe>/logs/<UTC time>-<pid>[-rank<N>].log`: the run's whole console output (what
it prints, its progress bars, library warnings), every toolchain log record down to DEBUG (the console shows INFO),
the tails of child processes that failed, and the traceback of any failure, which the console shows as one line."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from toolchain.errors import last_line

_file: TextIO | None = None
_path: Path | None = None


class _Tee(io.TextIOBase):
    """Writes to the console stream and the log file alike; looks like the console to whoever asks (tqdm)."""

    def __init__(self, console: TextIO, file: TextIO):
        self.console = console
        self.file = file

    def write(self, s: str) -> int:
        self.console.write(s)
        with contextlib.suppress(ValueError):  # the file is closed: a thread printing after the run ended
            self.file.write(s)
        return len(s)

    def flush(self) -> None:
        self.console.flush()
        with contextlib.suppress(ValueError):
            self.file.flush()

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


def child_failed(what: str, returncode: int, output: str) -> str:
    """One line for a child process that failed, its output's tail kept in the run's log."""
    to_file(f"--- {what}: exit code {returncode}; the end of its output:\n{output[-20000:]}\n---")
    how = f"exit code {returncode}" if returncode >= 0 else f"killed by signal {-returncode}"
    return f"{what} failed in its process ({how}): {last_line(output)}; its output is in {where()}"
