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
