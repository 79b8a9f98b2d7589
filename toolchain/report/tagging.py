"""The token-classification report: report.json (kind `tagging`) and report.md. Entity-level F1 (x 100, exact span
and type) on the eval and test sentences for every variant, the drop against fp32, per-type F1 of the shipped
variant, latency as for classifiers, where the metric went (the test entities each variant lost and gained against
fp32 PyTorch) and the shipped bundle's spans on fixed example sentences, found from raw text by Tagger."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.core.task import Choice
from toolchain.report.common import atomic_write, report_head, save_report
from toolchain.report.rows import TaggerRow

if TYPE_CHECKING:
    from toolchain.core.context import RunContext

README_BLOCK = "tagging-results"

# The sentences the span decoding is tested on with fixed tags (tests/test_tagging.py), shown through the shipped
# bundle in every report: a word cut into several pieces and an entity at the end; emoji and CJK characters before
# an entity; irregular spacing (where a tag sequence may open with an I- tag)
EXAMPLES = [
    "Visited Gwendolyn at the Empire State Building",
    "😀 東京 loves Apple",
    "new  iPhone   Pro from Apple",
]


def write(ctx: RunContext, rows: list[TaggerRow], choice: Choice[TaggerRow], bundle: Path | None) -> Path:
    """Write report.json and report.md into the run folder; returns the JSON path."""
    recipe = ctx.recipe
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    data = report_head(ctx, bench, ctx.artifacts["finetune"].meta, rows, choice, bundle)
    test = ctx.test
    data["data"] |= {"test": recipe.data.test, "test_rows": len(test) if test is not None else 0}
    data |= {
        "kind": "tagging",
        "metric": "entity_f1",
        "latency_case": choice.latency_case,
        "rounds": bench.get("rounds"),
        "resources": ctx.resources,
    }
    if bundle is not None and (bundle / "manifest.json").is_file():
        from toolchain.runtime import Tagger

        tagger = Tagger.load(bundle, threads=ctx.threads)
        found = tagger.tag(EXAMPLES)
        data["examples"] = [
            {"text": text, "entities": [e.__dict__ for e in spans]} for text, spans in zip(EXAMPLES, found, strict=True)
        ]
        shipped = next(r for r in rows if r["name"] == choice.shipped)
        data["raw_text_agreement"] = raw_text_agreement(ctx, tagger, shipped["name"])
    return save_report(ctx, data, render)


def raw_text_agreement(ctx: RunContext, tagger: Any, variant: str) -> dict[str, Any]:
    """The shipped bundle on the test sentences joined by spaces (raw text, `Tagger.tag`) against the entities the
    evaluation found on their words: the share of sentences with the same entities (type and words)."""
    from toolchain.runtime import bio_entities

    split = ctx.test if ctx.test is not None else ctx.eval
    assert split.words is not None
    name = "test" if ctx.test is not None else "eval"
    measured = json.loads(ctx.artifacts[f"evaluate.{variant}"].file("metrics.json").read_text())[name]["predicted"]
    tags = ctx.recipe.data.labels
    found = tagger.tag([" ".join(ws) for ws in split.words])
    same = 0
    for ws, predicted, spans in zip(split.words, measured, found, strict=True):
        want = {(k, " ".join(ws[a : b + 1])) for k, a, b in bio_entities([tags[t] for t in predicted])}
        same += int({(e.type, e.text) for e in spans} == want)
    return {"split": name, "sentences": len(split), "same_entities": same}


def render(report_json: Path) -> None:
    data = json.loads(report_json.read_text())
    atomic_write(report_json.with_name("report.md"), markdown(data))


def results_table(data: dict[str, Any]) -> str:
    return table(data["variants"], data["latency_case"], data.get("verdicts"))


def table(rows: Sequence[Mapping[str, Any]], case: str, verdicts: dict[str, str] | None = None) -> str:
    cases = list(rows[0]["latency_ms"]) if rows else []
    head = (
        "| variant | entity F1 eval | entity F1 test | Δ eval vs fp32 | test entities lost / gained | MB | "
        + " | ".join(f"{c} p50 ms" for c in cases)
        + f" | {case} vs PyTorch (range over rounds) |"
    )
    lines = [head, "| " + " | ".join(["---"] * (7 + len(cases))) + " |"]
    for r in rows:
        shipped = verdicts and verdicts.get(r["name"], "").startswith("shipped")
        name = r["name"] + (" **(shipped)**" if shipped else "")
        ratio = r["latency_ratio_to_pytorch"].get(case)
        ci = r.get("latency_ratio_ci", {}).get(case)
        spread = f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
        delta = round(-100 * r["accuracy_drop"], 2) + 0.0  # + 0.0: no "-0.00"
        changes = r.get("entity_changes")
        moved = f"{changes['lost']} / {changes['gained']}" if changes else ""
        test = f"{r['f1']['test']:.2f}" if "test" in r["f1"] else ""
        lines.append(
            f"| {name} | {r['f1']['eval']:.2f} | {test} | {delta:+.2f} | {moved} | {r['size_bytes'] / 1e6:.1f} | "
            + " | ".join(f"{r['latency_ms'][c]['p50']:.2f}" for c in cases)
            + (f" | {ratio:.2f}x{spread} |" if ratio is not None else " | |")
        )
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    env, d = data["environment"], data["data"]
    case = data["latency_case"]
    rows = data["variants"]
    lines = [
        f"# {data['recipe']}: token classification",
        "",
        f"{env.get('cpu_model')}, {env.get('threads')} threads; measured at commit "
        f"`{(data.get('measured_at_commit') or '?')[:12]}`. Eval `{d['eval']}` ({d['eval_rows']} sentences: the "
        f"choice), test `{d['test']}` ({d['test_rows']} sentences: reported). Entity-level F1 x 100 (exact span and "
        f"type, seqeval) on the gold word split; each word's tag is read at its first sub-token. Tags: "
        f"{', '.join(d['labels'])} ({d['labels_from']}).",
        "",
        table(rows, case, data.get("verdicts")),
        "",
        f"Shipped: **{data.get('shipped') or 'nothing'}** (budget: entity F1 drop at most "
        f"{100 * data['budget']['max_accuracy_drop']:.2f} points on eval, fastest at `{case}`).",
        "",
        "## Verdicts",
        "",
        *(f"- `{name}`: {why}" for name, why in data.get("verdicts", {}).items()),
    ]
    shipped = next((r for r in rows if r["name"] == data.get("shipped")), None)
    if shipped:
        split = "test" if "test" in shipped["per_type"] else "eval"
        lines += ["", f"## Per entity type: `{shipped['name']}` on {split}", "", "| type | F1 | entities |"]
        lines += ["| --- | --- | --- |"]
        lines += [
            f"| {kind} | {v['f1']:.2f} | {v['support']} |" for kind, v in sorted(shipped["per_type"][split].items())
        ]
        changes = shipped.get("entity_changes")
        if changes:
            lines += [
                "",
                f"## Where the metric went: `{shipped['name']}` against fp32 PyTorch on {changes['split']}",
                "",
                f"{changes['lost']} entities lost, {changes['gained']} gained.",
                "",
                "| change | row | type | entity |",
                "| --- | --- | --- | --- |",
            ]
            for what in ("lost", "gained"):
                lines += [f"| {what} | {e['row']} | {e['type']} | {e['text']} |" for e in changes[f"{what}_examples"]]
    agreement = data.get("raw_text_agreement")
    if agreement:
        lines += [
            "",
            f"Raw text: `Tagger.tag` on the {agreement['split']} sentences joined by spaces finds the entities the "
            f"evaluation found on their words in {agreement['same_entities']} of {agreement['sentences']} sentences.",
        ]
    if data.get("examples"):
        lines += ["", "## The shipped bundle on example sentences (raw text, `Tagger.tag`)", ""]
        for ex in data["examples"]:
            spans = ", ".join(
                f"`{e['text']}` {e['type']} [{e['start']}:{e['end']}] {e['score']:.2f}" for e in ex["entities"]
            )
            lines.append(f"- {ex['text']} → {spans or 'no entity'}")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['key']} | {s['status']} | {s['seconds']:.1f} |" for s in data.get("stages", [])]
    return "\n".join(lines) + "\n"
