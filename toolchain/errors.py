"""Errors the user can act on. The CLI prints them without a traceback and exits with `exit_code`."""

from __future__ import annotations


class ToolchainError(Exception):
    """A failure with a message that says what went wrong and what to do."""

    exit_code = 1


class RecipeError(ToolchainError):
    """The recipe (or its data, model source, overrides) is invalid; found before any compute."""

    exit_code = 2

    def __init__(self, file: str, problems: list[str]):
        self.file = file
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid recipe {file}:\n{lines}")


class StageError(ToolchainError):
    """A stage ran and failed a check (parity, budget); the message carries the measured numbers."""

    exit_code = 3

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage {stage} failed: {message}")


class UnexpectedError(ToolchainError):
    """An exception the toolchain did not raise itself (a bug, a library's error, a model it cannot handle), re-raised
    with the stage it happened in and what was kept; the CLI prints it as one line and the traceback goes to the
    run's log. The original exception is `__cause__`."""

    exit_code = 1

    def __init__(self, stage: str, error: BaseException, kept: str):
        self.stage = stage
        self.error = error
        self.kept = kept
        super().__init__(f"stage {stage} failed unexpectedly: {one_line(error)}; {kept}")


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters of message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a child process's output (a Python traceback's exception line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "(no output)"
    return line if len(line) <= limit else line[:limit] + "..."


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a CI runner cancelling, a container stopping): handled like Ctrl-C, exit code 143."""
