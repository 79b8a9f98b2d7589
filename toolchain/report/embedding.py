"""The sentence-embedding report: report.json (kind `embedding`) and report.md. Spearman x 100 of the cosine
similarity on the eval and test pairs for every variant, the drop against fp32, the fidelity to the fp32 embedder
(mean cosine of the same text's two embeddings, nearest neighbours kept over a corpus), latency as for classifiers,
and where the metric went: the eval pairs whose similarity moved most in the shipped variant."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.core.task import Choice
from toolchain.report.common import atomic_write, report_head, save_report
from toolchain.report.rows import EmbedderRow

if TYPE_CHECKING:
    from toolchain.core.context import RunContext

README_BLOCK = "embedding-results"


def write(ctx: RunContext, rows: list[EmbedderRow], choice: Choice[EmbedderRow], bundle: Path | None) -> Path:
    """Write report.json and report.md into the run folder; returns the JSON path."""
    recipe = ctx.recipe
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    data = report_head(ctx, bench, ctx.artifacts["finetune"].meta, rows, choice, bundle)
    test = ctx.test
    for key in ("labels", "labels_from"):  # scored pairs: no label names
        data["data"].pop(key)
    data["data"] |= {
        "text": recipe.data.text,
        "text_pair": recipe.data.text_pair,
        "score": recipe.data.label,
        "test": recipe.data.test,
        "test_rows": len(test) if test is not None else 0,
    }
    data |= {
        "kind": "embedding",
        "metric": "spearman",
        "latency_case": choice.latency_case,
        "rounds": bench.get("rounds"),
        "embedding": recipe.embedding.model_dump(mode="json") if recipe.embedding else None,
        "resources": ctx.resources,
    }
    if bundle is not None and (bundle / "manifest.json").is_file():
        manifest = json.loads((bundle / "manifest.json").read_text())
        data["bundle_contents"] = {"bundle_bytes": manifest.get("bundle_bytes"), "files": sorted(manifest["files"])}
    return save_report(ctx, data, render)


def render(report_json: Path) -> None:
    data = json.loads(report_json.read_text())
    atomic_write(report_json.with_name("report.md"), markdown(data))


def results_table(data: dict[str, Any]) -> str:
    return table(data["variants"], data["latency_case"], data.get("verdicts"))


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def table(rows: Sequence[Mapping[str, Any]], case: str, verdicts: dict[str, str] | None = None) -> str:
    cases = list(rows[0]["latency_ms"]) if rows else []
    head = (
        "| variant | Spearman eval | Spearman test | Δ eval vs fp32 | mean cos to fp32 | neighbours kept % | MB | "
        + " | ".join(f"{c} p50 ms" for c in cases)
        + f" | {case} vs PyTorch (range over rounds) |"
    )
    lines = [head, "| " + " | ".join(["---"] * (8 + len(cases))) + " |"]
    for r in rows:
        shipped = verdicts and verdicts.get(r["name"], "").startswith("shipped")
        name = r["name"] + (" **(shipped)**" if shipped else "") + (" *(reference)*" if r.get("reference") else "")
        fid = r.get("fidelity") or {}
        ratio = r["latency_ratio_to_pytorch"].get(case)
        ci = r.get("latency_ratio_ci", {}).get(case)
        spread = f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
        delta = round(-100 * r["accuracy_drop"], 2) + 0.0  # + 0.0: no "-0.00"
        lines.append(
            f"| {name} | {r['spearman'].get('eval', 0):.2f} | "
            + (f"{r['spearman']['test']:.2f}" if "test" in r["spearman"] else "")
            + f" | {delta:+.2f} | "
            + (f"{fid['mean_cosine_eval']:.5f}" if "mean_cosine_eval" in fid else "")
            + f" | {_pct(fid.get('neighbours_kept'))} | {r['size_bytes'] / 1e6:.1f} | "
            + " | ".join(f"{r['latency_ms'][c]['p50']:.2f}" for c in cases)
            + (f" | {ratio:.2f}x{spread} |" if ratio is not None else " | |")
        )
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    env, d = data["environment"], data["data"]
    case = data["latency_case"]
    rows = data["variants"]
    lines = [
        f"# {data['recipe']}: sentence embeddings",
        "",
        f"{env.get('cpu_model')}, {env.get('threads')} threads; measured at commit "
        f"`{(data.get('measured_at_commit') or '?')[:12]}`. Pairs `{d['text']}` / `{d['text_pair']}`, gold score "
        f"`{d['score']}`; eval `{d['eval']}` ({d['eval_rows']} pairs: the choice), test `{d['test']}` "
        f"({d['test_rows']} pairs: reported). Spearman x 100 of the cosine similarity against the gold scores. "
        f"Fine-tuning: {data['finetune']['method']}.",
        "",
        table(rows, case, data.get("verdicts")),
        "",
        f"Shipped: **{data.get('shipped') or 'nothing'}** (budget: Spearman drop at most "
        f"{100 * data['budget']['max_accuracy_drop']:.2f} points on eval, fastest at `{case}`).",
        "",
        "## Verdicts",
        "",
        *(f"- `{name}`: {why}" for name, why in data.get("verdicts", {}).items()),
    ]
    emb = data.get("embedding") or {}
    if emb.get("corpus"):
        lines += [
            "",
            f"Fidelity: `mean cos to fp32` is the mean cosine between a variant's embedding of each eval text and the "
            f"fp32 PyTorch embedder's; `neighbours kept` is the share of each of the first {emb['corpus_rows']} "
            f"texts of `{emb['corpus']}`'s {emb['neighbours']} nearest neighbours the variant keeps.",
        ]
    shipped = next((r for r in rows if r["name"] == data.get("shipped")), None)
    if shipped and shipped.get("moved_pairs"):
        lines += [
            "",
            f"## Where the metric went: the eval pairs whose similarity moved most in `{shipped['name']}`",
            "",
            "| row | text | text pair | gold | fp32 cos | variant cos |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for p in shipped["moved_pairs"]:
            lines.append(
                f"| {p['row']} | {p['text'][:70]} | {p['text_pair'][:70]} | {p['gold']:.2f} | {p['fp32_cosine']:.4f} "
                f"| {p['variant_cosine']:.4f} |"
            )
    lines += ["", "## Stages", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['key']} | {s['status']} | {s['seconds']:.1f} |" for s in data.get("stages", [])]
    return "\n".join(lines) + "\n"
