"""The task interface: what the engine asks of a kind of model (a classifier, a decoder answering with label words,
...) and the registry of tasks. A task plans its stages and variants, turns the finished artifacts into report rows,
chooses the variant to ship, names the bundle stage and writes its report; the engine does everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from typing_extensions import TypedDict  # pydantic validates these on Python 3.11 only in this form

if TYPE_CHECKING:
    from toolchain.core.artifact import StageCall
    from toolchain.core.context import RunContext
    from toolchain.recipe.schema import Recipe


@dataclass(frozen=True)
class Variant:
    """A model the report compares: where it comes from (an artifact key) and how it runs."""

    name: str
    source: str  # key of the artifact that holds the model
    format: str  # pytorch | onnx
    precision: str  # fp32 | int8 | int4 ...


class Row(TypedDict):
    """A report row: one variant, measured. Every task's rows have these keys (toolchain.report.rows has the
    tasks' own row types, which add theirs)."""

    name: str
    format: str  # pytorch | onnx
    precision: str
    accuracy: float  # the task's primary metric on the 0-1 scale (embeddings: Spearman / 100)
    correct: int | None  # None: the metric is not a count of right answers
    eval_rows: int
    accuracy_drop: float  # vs the PyTorch fp32 baseline, as a fraction
    size_bytes: int


R = TypeVar("R", bound=Row)


@dataclass
class Choice(Generic[R]):
    """Which variant ships (None: none meets the budget) and a verdict for every variant."""

    shipped: str | None
    latency_case: str  # the case (or measure) the choice was made on
    verdicts: dict[str, str] = field(default_factory=dict)  # variant -> why chosen / rejected
    rows: list[R] = field(default_factory=list)


class Task(Protocol[R]):
    name: str
    # the stage that several processes run together under torchrun (None: the task trains in one process)
    distributed_stage: str | None

    def matches(self, recipe: Recipe) -> bool:
        """Is this recipe one of this task's?"""

    def expect_resources(self, ctx: RunContext) -> dict[str, Any]:
        """The disk and memory the run expects; a ResourceError before any compute when they do not fit."""

    def plan(self, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
        """The stage calls up to the choice, in order, and the variants they produce."""

    def rows(self, ctx: RunContext, variants: list[Variant]) -> list[R]:
        """One report row per variant, from the finished artifacts."""

    def choose(self, rows: list[R], recipe: Recipe) -> Choice[R]:
        """The variant to ship within the recipe's budget."""

    def explain(self, choice: Choice[R]) -> str:
        """The choice as a table, for the error when nothing meets the budget."""

    def bundle_call(self, ctx: RunContext, variants: list[Variant], choice: Choice[R]) -> StageCall:
        """The stage that packages the shipped variant."""

    def write_report(self, ctx: RunContext, rows: list[R], choice: Choice[R], bundle: Path | None) -> Path:
        """report.json/md/png in the run folder."""


TASKS: list[Task[Any]] = []


def register_task(task: Task[Any]) -> Task[Any]:
    """Add a task; the engine runs a recipe with the last registered task that matches it."""
    if any(t.name == task.name for t in TASKS):
        raise RuntimeError(f"task {task.name!r} registered twice")
    TASKS.append(task)
    return task


def task_for(recipe: Recipe) -> Task[Any]:
    for task in reversed(TASKS):
        if task.matches(recipe):
            return task
    raise RuntimeError(f"no registered task runs recipe '{recipe.name}'; tasks: {', '.join(t.name for t in TASKS)}")
