"""The CI regression gate: a run's report against a committed baseline.

Latency is compared as the ratio of each variant's p50 to PyTorch fp32 eager's p50 *in the same run*, so a slower or
busier machine does not fail the gate, and only beyond what the measured noise explains: a variant regresses on a
case when even the low end of its ratio's range this run (the smallest per-round ratio) is above the high end of the
baseline's range by more than `latency_tolerance`. Accuracy regresses when it falls more than `accuracy_tolerance`
below the baseline's. A variant of the baseline missing from the run fails the gate too (a renamed or dropped
variant must be re-baselined on purpose: `make bench-baseline`).

A generation report (decoder LMs) is gated the same way on accuracy and on decode tokens/s as a ratio to PyTorch
eager in the same run (higher is better): it regresses when even the high end of this run's per-round ratios is
below the low end of the baseline's by more than `latency_tolerance`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from toolchain.choose import BASELINE
from toolchain.errors import ToolchainError
from toolchain.report.rows import (
    GateSummary,
    GateVariant,
    GeneratorRow,
    classifier_rows,
    gate_summary,
    generator_rows,
    problems,
)

FORMAT_VERSION = 1
DEFAULT_ACCURACY_TOLERANCE = 0.005  # 0.5 points: about 4 rows of SST-2 dev
DEFAULT_LATENCY_TOLERANCE = 0.10  # 10% beyond the two ranges


class GateError(ToolchainError):
    """The run regressed against the baseline; the message is the table of what failed."""

    exit_code = 4


@dataclass
class Check:
    variant: str
    metric: str
    baseline: str
    current: str
    limit: str
    ok: bool

    def row(self) -> str:
        verdict = "ok" if self.ok else "**REGRESSION**"
        return f"| {self.variant} | {self.metric} | {self.baseline} | {self.current} | {self.limit} | {verdict} |"


def summarize(report: dict[str, Any], where: Path | str = "report.json") -> GateSummary:
    """What a baseline keeps of a report: per variant, accuracy and each case's ratio to PyTorch with its range
    (a generation report: decode tokens/s against PyTorch, with the range of the per-round ratios)."""
    env = report["environment"]
    head: GateSummary = {
        "format_version": FORMAT_VERSION,
        "recipe": report["recipe"],
        "measured_at_commit": report.get("measured_at_commit"),
        "environment": {k: env.get(k) for k in ("cpu_model", "cores_physical", "threads", "versions")},
        "eval_rows": report["data"]["eval_rows"],
        "variants": {},
    }
    try:
        if report.get("kind") == "generation":
            rows = generator_rows().validate_python(report["variants"])
            pt = next((r for r in rows if r["name"] == BASELINE), None)
            head["kind"] = "generation"
            head["variants"] = {r["name"]: _generation_variant(r, pt) for r in rows}
            return head
        head["variants"] = {
            r["name"]: {
                "accuracy": r["accuracy"],
                "correct": r["correct"],
                "p50_ms": {c: s["p50"] for c, s in r["latency_ms"].items()},
                "ratio_to_pytorch": r["latency_ratio_to_pytorch"],
                "ratio_range": r["latency_ratio_ci"],
            }
            for r in classifier_rows().validate_python(report["variants"])
        }
    except ValidationError as e:
        raise ToolchainError(
            f"{where}: its variants are not report rows of this version ({problems(e)}); run the recipe again"
        ) from None
    return head


def _generation_variant(row: GeneratorRow, pt: GeneratorRow | None) -> GateVariant:
    out: GateVariant = {"accuracy": row["accuracy"], "correct": row["correct"]}
    if "decode_speedup" in row and pt is not None and row["name"] != BASELINE:
        mine, theirs = row.get("decode_tokens_per_second_rounds", []), pt.get("decode_tokens_per_second_rounds", [])
        per_round = [a / b for a, b in zip(mine, theirs, strict=True)]
        out["decode_speedup"] = row["decode_speedup"]
        out["decode_speedup_range"] = [min(per_round), max(per_round)]
    return out


def compare(
    current: GateSummary,
    baseline: GateSummary,
    accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE,
    latency_tolerance: float = DEFAULT_LATENCY_TOLERANCE,
) -> list[Check]:
    """Every check of the gate, in a stable order: per baseline variant, accuracy then each latency case."""
    checks = []
    for name, base in baseline["variants"].items():
        cur = current["variants"].get(name)
        if cur is None:
            checks.append(Check(name, "present", "yes", "missing from this run", "must be present", False))
            continue
        floor = base["accuracy"] - accuracy_tolerance
        checks.append(
            Check(
                name,
                "accuracy %",
                f"{base['accuracy'] * 100:.2f}",
                f"{cur['accuracy'] * 100:.2f}",
                f">= {floor * 100:.2f}",
                cur["accuracy"] >= floor - 1e-12,
            )
        )
        if name == BASELINE:
            continue  # the ratios' denominator
        if "decode_speedup" in base:  # generation: higher is better
            b_lo, b_hi = base["decode_speedup_range"]
            if "decode_speedup" not in cur:
                was = f"{base['decode_speedup']:.2f}x"
                checks.append(Check(name, "decode tokens/s vs PyTorch", was, "not timed", "", False))
                continue
            c_lo, c_hi = cur["decode_speedup_range"]
            floor = b_lo * (1 - latency_tolerance)
            checks.append(
                Check(
                    name,
                    "decode tokens/s vs PyTorch",
                    f"{base['decode_speedup']:.2f}x ({b_lo:.2f}–{b_hi:.2f})",
                    f"{cur['decode_speedup']:.2f}x ({c_lo:.2f}–{c_hi:.2f})",
                    f"high end >= {floor:.2f}x",
                    c_hi >= floor,
                )
            )
        for case, base_ratio in base.get("ratio_to_pytorch", {}).items():
            if case not in cur["ratio_to_pytorch"]:
                checks.append(Check(name, f"{case} vs PyTorch", f"{base_ratio:.3f}x", "case missing", "", False))
                continue
            b_lo, b_hi = base["ratio_range"].get(case) or [base_ratio, base_ratio]
            c_ratio = cur["ratio_to_pytorch"][case]
            c_lo, c_hi = cur["ratio_range"].get(case) or [c_ratio, c_ratio]
            limit = b_hi * (1 + latency_tolerance)
            checks.append(
                Check(
                    name,
                    f"{case} p50 vs PyTorch",
                    f"{base_ratio:.3f}x ({b_lo:.3f}–{b_hi:.3f})",
                    f"{c_ratio:.3f}x ({c_lo:.3f}–{c_hi:.3f})",
                    f"low end <= {limit:.3f}x",
                    c_lo <= limit,
                )
            )
    return checks


def table(checks: list[Check]) -> str:
    lines = [
        "| variant | metric | baseline | this run | limit | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(lines + [c.row() for c in checks])


def load_baseline(path: Path) -> GateSummary:
    if not path.is_file():
        raise ToolchainError(f"{path}: no baseline; create it on purpose with `make bench-baseline`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ToolchainError(f"{path}: not valid JSON ({e}); recreate it with `make bench-baseline`") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or "variants" not in data:
        raise ToolchainError(
            f"{path}: not a baseline of format {FORMAT_VERSION}; recreate it with `make bench-baseline`"
        )
    try:
        return gate_summary().validate_python(data)
    except ValidationError as e:
        raise ToolchainError(
            f"{path}: not a baseline of this version ({problems(e)}); recreate it with `make bench-baseline`"
        ) from None


def run_gate(
    run_dir: Path,
    baseline_path: Path,
    accuracy_tolerance: float | None = None,
    latency_tolerance: float | None = None,
) -> str:
    """Compare a run with the baseline; returns the markdown, raises GateError (with it) on a regression."""
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise ToolchainError(f"{report_path}: no report; run the recipe first")
    baseline = load_baseline(baseline_path)
    tolerances = baseline.get("tolerances", {})
    acc_tol = (
        accuracy_tolerance if accuracy_tolerance is not None else tolerances.get("accuracy", DEFAULT_ACCURACY_TOLERANCE)
    )
    lat_tol = (
        latency_tolerance if latency_tolerance is not None else tolerances.get("latency", DEFAULT_LATENCY_TOLERANCE)
    )
    current = summarize(json.loads(report_path.read_text()), report_path)
    kinds = (baseline.get("kind", "classifier"), current.get("kind", "classifier"))
    if kinds[0] != kinds[1]:
        raise ToolchainError(
            f"{baseline_path}: a baseline of a {kinds[0]} recipe, but {report_path} is a {kinds[1]} report; "
            f"gate against the baseline of the same recipe, or create one with "
            f"`python -m toolchain baseline {run_dir} --out bench/baselines/{run_dir.name}.json`"
        )
    checks = compare(current, baseline, acc_tol, lat_tol)
    failed = [c for c in checks if not c.ok]
    text = "\n".join(
        [
            f"## Bench gate: {run_dir.name} against {baseline_path}",
            "",
            f"Baseline measured at commit `{(baseline.get('measured_at_commit') or '?')[:12]}` on "
            f"{baseline['environment'].get('cpu_model')}; this run at "
            f"`{(current.get('measured_at_commit') or '?')[:12]}` on {current['environment'].get('cpu_model')}. "
            f"Tolerances: accuracy {acc_tol * 100:.2f} pts, latency ratio {lat_tol * 100:.0f}% beyond both ranges.",
            "",
            table(checks),
            "",
            f"{len(checks) - len(failed)} of {len(checks)} checks pass"
            + (": " + "; ".join(f"{c.variant} {c.metric}" for c in failed) + " regressed" if failed else "."),
        ]
    )
    if failed:
        raise GateError(text)
    return text


def write_baseline(run_dir: Path, out: Path, accuracy_tolerance: float, latency_tolerance: float) -> GateSummary:
    """Summarize a run into a baseline file (written atomically)."""
    data = summarize(json.loads((run_dir / "report.json").read_text()), run_dir / "report.json")
    data["tolerances"] = {"accuracy": accuracy_tolerance, "latency": latency_tolerance}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)
    return data
