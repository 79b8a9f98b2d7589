"""The one engine, for every task: run(recipe) = lock -> resources -> plan -> execute (forced stages and what reads
them rerun) -> choose -> bundle -> publish -> report -> lineage. What differs between tasks is behind
`toolchain.core.task.Task`; the artifact store (ids, reuse, atomic builds) is `toolchain.core.store`."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from toolchain.core import faults
from toolchain.core.artifact import StageCall, StageRecord
from toolchain.core.context import RunContext, StageContext
from toolchain.core.distributed import barrier, is_distributed, rank
from toolchain.core.lineage import write_lineage
from toolchain.core.lock import run_lock
from toolchain.core.publish import publish_bundle
from toolchain.core.registry import STAGES, Stage, typed_config
from toolchain.core.store import (
    checkpoint_dir,
    is_complete,
    phase,
    prepare_run_dir,
    rel_path,
    run_stage,
    stage_id,
)
from toolchain.core.task import Task, task_for
from toolchain.errors import StageError, ToolchainError
from toolchain.recipe.schema import Recipe

log = logging.getLogger("toolchain")


def load_all() -> dict[str, Stage]:
    """Import every task, and so every stage, so that both registries are complete."""
    from toolchain.tasks import classification, embedding, generation, pairs, tagging  # noqa: F401

    return STAGES


def planned_ids(ctx: RunContext) -> list[tuple[StageCall, str]]:
    """Every stage call a recipe makes before the choice (the bundle's id depends on what is chosen) with the id it
    gets on this run context, computed without running anything."""
    load_all()
    calls, _ = task_for(ctx.recipe).plan(ctx)
    ids: dict[str, str] = {}
    out = []
    for call in calls:
        typed_config(call)
        ids[call.key] = stage_id(call, {k: ids[k] for k in call.inputs}, ctx.versions)
        out.append((call, ids[call.key]))
    return out


def run(recipe: Recipe, runs_root: Path | None = None, force: tuple[str, ...] = ()) -> RunContext:
    """Run every stage of a recipe; write the bundle and the report. Returns the context (records, artifacts)."""
    load_all()
    task = task_for(recipe)
    if is_distributed() and task.distributed_stage is None:
        raise ToolchainError(
            f"recipe '{recipe.name}' is a {task.name} recipe, which trains in one process; run it without torchrun "
            "(make with NPROC=1, the default)"
        )
    ctx = RunContext(recipe, runs_root)
    if rank() != 0:
        return _run_worker(ctx, task, force)
    with run_lock(ctx.run_dir):
        log.info("run %s -> %s", recipe.name, rel_path(ctx.run_dir))
        prepare_run_dir(ctx)
        with phase(ctx, "plan"):
            ctx.resources = task.expect_resources(ctx)
            calls, variants = task.plan(ctx)
            for call in calls:
                typed_config(call)  # a config its stage cannot read fails now, before any compute
        unknown = [f for f in force if f not in {c.key for c in calls} | {c.stage for c in calls} | {"bundle"}]
        if unknown:
            raise ToolchainError(
                f"--force {', '.join(unknown)}: no such stage; stages: {', '.join(c.key for c in calls)}, bundle"
            )
        forced: set[str] = set()
        for call in calls:
            if call.stage == task.distributed_stage:
                barrier()  # every rank decides reuse-or-train on the same state
            # A forced stage can write different files under the same id, so what reads it is forced too.
            if call.key in force or call.stage in force or forced & set(call.inputs):
                forced.add(call.key)
            run_stage(ctx, call, force=call.key in forced)
            if call.stage == task.distributed_stage:
                barrier()  # the workers are done; rank 0 goes on alone
        with phase(ctx, "choose"):
            rows = task.rows(ctx, variants)
            choice = task.choose(rows, recipe)
        if choice.shipped is None:
            with phase(ctx, "report"):
                task.write_report(ctx, rows, choice, None)
            raise StageError("bundle", "no variant meets the recipe's budget:\n" + task.explain(choice))
        bundle_call = task.bundle_call(ctx, variants, choice)
        art = run_stage(ctx, bundle_call, force="bundle" in force or bool(forced & set(bundle_call.inputs)))
        with phase(ctx, "publish"):
            bundle_dir = publish_bundle(art, ctx.run_dir / "bundle")
        with phase(ctx, "report"):
            task.write_report(ctx, rows, choice, bundle_dir)
            write_lineage(ctx)
    return ctx


def _run_worker(ctx: RunContext, task: Task[Any], force: tuple[str, ...]) -> RunContext:
    """A torchrun rank other than 0: train with the others in the task's distributed stage, write nothing, stop."""
    calls, _ = task.plan(ctx)
    call = next(c for c in calls if c.stage == task.distributed_stage)
    barrier()
    sid = stage_id(call, {}, ctx.versions)
    ok, _ = is_complete(ctx.stages_dir / f"{call.key}-{sid[:12]}", sid)
    if not ok or call.key in force or call.stage in force:
        scratch = Path(tempfile.mkdtemp(prefix=f"toolchain-rank{rank()}-"))
        ctx.checkpoint_dir = checkpoint_dir(ctx, call.key, sid)
        try:
            with phase(ctx, call.key), faults.in_stage(call.key, call.stage):
                meta = STAGES[call.stage].fn(StageContext(ctx, call, typed_config(call)), call, {}, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ctx.records.append(StageRecord(call.key, call.stage, sid, "ran", 0.0, "", call.config, {}, meta))
    barrier()
    return ctx
