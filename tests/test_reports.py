"""What outside readers rely on: report.json keeps its keys (baselines, the gate and people's scripts read it), and
the README's generated blocks update from a report, each kind its own block, nothing else touched.

The key sets are committed (tests/golden/report_keys.json, taken from the tiny classification and generation runs);
rewrite them on purpose with TOOLCHAIN_WRITE_GOLDEN=1."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parent / "golden" / "report_keys.json"


def key_paths(data: Any, prefix: str = "") -> set[str]:
    """Every key path of a JSON document: `a.b` for mappings, `a[]` for a list (its items' keys depend on the data,
    so they are not followed)."""
    out = set()
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.add(path)
            out |= key_paths(v, path)
    elif isinstance(data, list):
        out.add(f"{prefix}[]")
    return out


def test_key_paths_follow_mappings_and_stop_at_lists() -> None:
    assert key_paths({"a": {"b": 1, "c": [{"d": 2}]}}) == {"a", "a.b", "a.c", "a.c[]"}


@pytest.fixture(scope="module")
def reports(first_run, tiny_run: Path) -> dict[str, dict[str, Any]]:
    _, _, ctx = first_run
    return {
        "classification": json.loads((ctx.run_dir / "report.json").read_text()),
        "generation": json.loads((tiny_run / "report.json").read_text()),
    }


def test_report_json_keeps_every_key(reports: dict[str, dict[str, Any]]) -> None:
    found = {kind: sorted(key_paths(data)) for kind, data in reports.items()}
    if os.environ.get("TOOLCHAIN_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(found, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    for kind in golden:
        missing = sorted(set(golden[kind]) - set(found[kind]))
        assert missing == [], f"{kind} report.json lost keys"
        assert sorted(set(found[kind]) - set(golden[kind])) == [], f"{kind}: new keys; rewrite the golden file"


def test_readme_blocks_update_from_each_kind_of_report(first_run, tiny_run: Path, tmp_path: Path) -> None:
    from toolchain.report.render import update_readme

    _, _, ctx = first_run
    before = "# App\n\nintro\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nmiddle\n\n"
    before += "<!-- llm-results:start -->\nold llm\n<!-- llm-results:end -->\n\nend\n"
    readme = tmp_path / "README.md"
    readme.write_text(before)
    update_readme(readme, ctx.run_dir / "report.json")
    text = readme.read_text()
    assert "| variant | accuracy % |" in text and "old\n" not in text and "old llm" in text
    update_readme(readme, tiny_run / "report.json")
    text = readme.read_text()
    assert "old llm" not in text and "| variant | accuracy % | Δ vs tuned fp32 (pts) |" in text
    outside = [part.split("-->", 1)[-1] for part in text.split("<!--") if part.startswith(" generated")]
    assert text.startswith("# App\n\nintro\n\n<!-- results:start -->") and text.endswith("end -->\n\nend\n")
    assert "\n\nmiddle\n\n" in text and len(outside) == 2


def test_report_rows_are_the_typed_rows(reports: dict[str, dict[str, Any]]) -> None:
    """report.json's variants[] are exactly the rows toolchain.report.rows types (no key more, none missing)."""
    from toolchain.report.rows import classifier_rows, generator_rows

    assert len(classifier_rows().validate_python(reports["classification"]["variants"])) >= 3
    assert len(generator_rows().validate_python(reports["generation"]["variants"])) >= 3
