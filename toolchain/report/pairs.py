"""The cross-encoder report: report.json (kind `pairs`) and report.md. The metric on the eval pairs (the choice) and
the test pairs for every variant (accuracy, or Spearman and Pearson x 100 of a regressor's score), the drop against
fp32, latency on the eval pairs as for classifiers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.core.task import Choice
from toolchain.report.common import atomic_write, report_head, save_report
from toolchain.report.rows import PairRow

if TYPE_CHECKING:
    from toolchain.core.context import RunContext

README_BLOCK = "pairs-results"


def write(ctx: RunContext, rows: list[PairRow], choice: Choice[PairRow], bundle: Path | None) -> Path:
    """Write report.json and report.md into the run folder; returns the JSON path."""
    recipe = ctx.recipe
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    data = report_head(ctx, bench, ctx.artifacts["finetune"].meta, rows, choice, bundle)
    test = ctx.test
    regression = recipe.pair_regression
    if regression:
        for key in ("labels", "labels_from"):  # a score: no label names
            data["data"].pop(key)
    data["data"] |= {
        "text": recipe.data.text,
        "text_pair": recipe.data.text_pair,
        "test": recipe.data.test,
        "test_rows": len(test) if test is not None else 0,
    }
    data |= {
        "kind": "pairs",
        "objective": "regression" if regression else "classification",
        "metric": "spearman" if regression else "accuracy",
        "latency_case": choice.latency_case,
        "rounds": bench.get("rounds"),
        "resources": ctx.resources,
    }
    return save_report(ctx, data, render)


def render(report_json: Path) -> None:
    data = json.loads(report_json.read_text())
    atomic_write(report_json.with_name("report.md"), markdown(data))


def results_table(data: dict[str, Any]) -> str:
    return table(data["variants"], data["latency_case"], data.get("verdicts"))


def table(rows: Sequence[Mapping[str, Any]], case: str, verdicts: dict[str, str] | None = None) -> str:
    cases = list(rows[0]["latency_ms"]) if rows else []
    measures = list(rows[0]["by_split"]["eval"]) if rows else []
    splits = list(rows[0]["by_split"]) if rows else []
    names = [f"{m} {s}" for s in splits for m in measures]
    head = (
        "| variant | "
        + " | ".join(names)
        + " | Δ eval vs fp32 | MB | "
        + " | ".join(f"{c} p50 ms" for c in cases)
        + f" | {case} vs PyTorch (range over rounds) |"
    )
    lines = [head, "| " + " | ".join(["---"] * (4 + len(names) + len(cases))) + " |"]
    for r in rows:
        shipped = verdicts and verdicts.get(r["name"], "").startswith("shipped")
        name = r["name"] + (" **(shipped)**" if shipped else "")
        scale = 1 if r["objective"] == "regression" else 100  # accuracy is a fraction, correlations are x 100
        values = [f"{r['by_split'][s][m] * scale:.2f}" for s in splits for m in measures]
        ratio = r["latency_ratio_to_pytorch"].get(case)
        ci = r.get("latency_ratio_ci", {}).get(case)
        spread = f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
        delta = round(-100 * r["accuracy_drop"], 2) + 0.0  # + 0.0: no "-0.00"
        lines.append(
            f"| {name} | "
            + " | ".join(values)
            + f" | {delta:+.2f} | {r['size_bytes'] / 1e6:.1f} | "
            + " | ".join(f"{r['latency_ms'][c]['p50']:.2f}" for c in cases)
            + (f" | {ratio:.2f}x{spread} |" if ratio is not None else " | |")
        )
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    env, d = data["environment"], data["data"]
    case = data["latency_case"]
    what = (
        "Spearman and Pearson x 100 of the predicted score against the gold scores"
        if data["objective"] == "regression"
        else f"accuracy % over the labels {', '.join(d.get('labels', []))}"
    )
    lines = [
        f"# {data['recipe']}: a cross-encoder on sentence pairs ({data['objective']})",
        "",
        f"{env.get('cpu_model')}, {env.get('threads')} threads; measured at commit "
        f"`{(data.get('measured_at_commit') or '?')[:12]}`. Pairs `{d['text']}` / `{d['text_pair']}` read together; "
        f"eval `{d['eval']}` ({d['eval_rows']} pairs: the choice), test `{d['test']}` ({d['test_rows']} pairs: "
        f"reported). {what}; latency on the eval pairs.",
        "",
        table(data["variants"], case, data.get("verdicts")),
        "",
        f"Shipped: **{data.get('shipped') or 'nothing'}** (budget: {data['metric']} drop at most "
        f"{100 * data['budget']['max_accuracy_drop']:.2f} points on eval, fastest at `{case}`).",
        "",
        "## Verdicts",
        "",
        *(f"- `{name}`: {why}" for name, why in data.get("verdicts", {}).items()),
        "",
        "## Stages",
        "",
        "| stage | status | seconds |",
        "| --- | --- | --- |",
        *(f"| {s['key']} | {s['status']} | {s['seconds']:.1f} |" for s in data.get("stages", [])),
    ]
    return "\n".join(lines) + "\n"
