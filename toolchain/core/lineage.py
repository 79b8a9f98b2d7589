"""lineage.json: which stages made a run's files, with their ids, configs, inputs and timings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolchain.core.context import RunContext


def write_lineage(ctx: RunContext) -> Path:
    path = ctx.run_dir / "lineage.json"
    data = {
        "recipe": ctx.recipe.name,
        "recipe_file": str(ctx.recipe.path) if ctx.recipe.path else None,
        "versions": ctx.versions,
        "stages": [r.__dict__ for r in ctx.records],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path
