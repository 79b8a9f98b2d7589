"""What every kind of report shares: the head of report.json (recipe, environment, data, budget, rows, verdicts,
stages), atomic writes, and a report's README block (written by toolchain.blocks)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.blocks import replace_block
from toolchain.core.provenance import environment

if TYPE_CHECKING:
    from toolchain.core.context import RunContext
    from toolchain.core.task import Choice, Row


def report_head(
    ctx: RunContext,
    bench: dict[str, Any],
    finetune: dict[str, Any],
    rows: Sequence[Row],
    choice: Choice[Any],
    bundle: Path | None,
) -> dict[str, Any]:
    """The keys every report.json has; a task's report adds its own sections."""
    recipe = ctx.recipe
    return {
        "recipe": recipe.name,
        "recipe_file": str(recipe.path) if recipe.path else None,
        "measured_at_commit": bench.get("git_commit"),  # the commit the numbers were measured at
        "environment": environment(ctx.threads, ctx.versions),
        "data": {
            "train": recipe.data.train,
            "train_rows": len(ctx.train),
            "eval": recipe.data.eval,
            "eval_rows": len(ctx.eval),
            "labels": recipe.data.labels,  # in the model's output order
            "labels_from": recipe.data._labels_read or "recipe",
        },
        "finetune": {"method": recipe.finetune.method, **finetune},
        "budget": recipe.budget.model_dump(mode="json"),
        "variants": rows,
        "verdicts": choice.verdicts,
        "shipped": choice.shipped,
        "bundle": str(bundle) if bundle else None,
        "stages": [{"key": r.key, "status": r.status, "seconds": r.seconds, "id": r.id[:12]} for r in ctx.records],
    }


def save_report(ctx: RunContext, data: dict[str, Any], render: Callable[[Path], None]) -> Path:
    """Write report.json into the run folder and render its Markdown and plots beside it; returns the JSON path."""
    path = ctx.run_dir / "report.json"
    atomic_write(path, json.dumps(data, indent=1))
    render(path)
    return path


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def update_readme_block(readme: Path, block: str, report_json: Path, table: str) -> None:
    """Replace the README's `<!-- {block}:start -->` ... `<!-- {block}:end -->` with a report's results table, under a
    line that says where and when it was measured (through the one block writer, toolchain.blocks)."""
    data: dict[str, Any] = json.loads(report_json.read_text())
    env = data["environment"]
    caption = (
        f"`{data['recipe']}` on {env.get('cpu_model')}, {env.get('threads')} threads, eval `{data['data']['eval']}` "
        f"({data['data']['eval_rows']} rows), measured at commit "
        f"`{(data.get('measured_at_commit') or env.get('git_commit') or '?')[:12]}`:"
    )
    command = f"python -m toolchain report {report_json.parent} --readme README.md"
    replace_block(readme, block, f"{caption}\n\n{table}", command)
