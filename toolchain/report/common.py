"""What every kind of report shares: atomic writes and a report's README block (written by toolchain.blocks)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from toolchain.blocks import replace_block


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
