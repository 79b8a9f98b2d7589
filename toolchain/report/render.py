"""report.md/png and the results table from any report.json, whatever task wrote it (its `kind`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

from toolchain.report import classification, embedding, generation, pairs, tagging
from toolchain.report.common import update_readme_block


def _kind(data: dict[str, Any]) -> ModuleType:
    kinds = {"generation": generation, "embedding": embedding, "tagging": tagging, "pairs": pairs}
    return kinds.get(data.get("kind", ""), classification)


def render(report_json: Path) -> None:
    """(Re)build report.md and the plots beside a report.json."""
    _kind(json.loads(report_json.read_text())).render(report_json)


def results_table(data: dict[str, Any]) -> str:
    """The variants side by side: the table the README and CI print."""
    table: str = _kind(data).results_table(data)
    return table


def update_readme(readme: Path, report_json: Path) -> None:
    """Replace the README's generated results block of this report's kind with its table."""
    data = json.loads(report_json.read_text())
    kind = _kind(data)
    update_readme_block(readme, kind.README_BLOCK, report_json, kind.results_table(data))
