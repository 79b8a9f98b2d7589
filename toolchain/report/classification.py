"""The classification report: report.json (the contract CI and later tools read), report.md (for people),
report.png (accuracy vs latency). Both text forms are generated from the same rows; `toolchain report` rebuilds
md/png from the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.choose import (
    BASELINE,
    RUNTIME_OF_FORMAT,
    choose_variant,
    pareto_front,
)
from toolchain.core.task import Choice
from toolchain.report.common import atomic_write, report_head, save_report
from toolchain.report.peers import peer_comparison
from toolchain.report.plots import plot, plot_latency, plot_training
from toolchain.report.rows import ClassifierRow

if TYPE_CHECKING:
    from toolchain.core.context import RunContext

README_BLOCK = "results"


def write(ctx: RunContext, rows: list[ClassifierRow], choice: Choice[ClassifierRow], bundle: Path | None) -> Path:
    """Write report.json, report.md and report.png into the run folder; returns the JSON path."""
    recipe = ctx.recipe
    bench = json.loads(ctx.artifacts["bench"].file("bench.json").read_text())
    data = report_head(ctx, bench, ctx.artifacts["finetune"].meta, rows, choice, bundle) | {
        "latency_case": choice.latency_case,
        "pareto_front": pareto_front(rows, choice.latency_case),
        # what would ship for each runtime an app could use, under the same budget
        "best_by_target": {
            t: choose_variant(rows, recipe.budget.model_copy(update={"target": t})).shipped
            for t in RUNTIME_OF_FORMAT.values()
        },
        "rounds": bench.get("rounds"),
        "targets": {
            **bench.get("targets", {}),
            "results": {
                t: {
                    name.rsplit("@", 1)[0]: {
                        c: {k: r[k] for k in ("p50", "p90", "p99", "p50_ci95")} for c, r in v["cases"].items()
                    }
                    for name, v in bench["variants"].items()
                    if name.endswith(f"@{t}")
                }
                for t in bench.get("targets", {}).get("measured", [])
                if t != "cpu"
            },
        },
        "resources": ctx.resources,
    }
    if bundle is not None and (bundle / "manifest.json").is_file():
        manifest = json.loads((bundle / "manifest.json").read_text())
        data["bundle_contents"] = {
            "bundle_bytes": manifest.get("bundle_bytes"),
            "forms": manifest.get("forms", {}),
            "app_start": manifest.get("app"),
            "strings_model": {
                k: v for k, v in (manifest.get("strings_model") or {}).items() if k not in ("inputs", "outputs")
            },
        }
    if "optimum-baseline" in ctx.artifacts:
        data["optimum_baseline"] = ctx.artifacts["optimum-baseline"].meta
    if "distill" in ctx.artifacts:
        data["distill"] = {
            **{k: v for k, v in ctx.artifacts["distill"].meta.items()},
            "settings": recipe.compile.distill.model_dump(mode="json") if recipe.compile.distill else None,
        }
    train_log = ctx.artifacts["finetune"].path / "train_log.json"
    if train_log.is_file():
        log = json.loads(train_log.read_text())
        data["training"] = {"loss_curve": log["loss_curve"], "validation_curve": log.get("validation_curve", [])}
    return save_report(ctx, data, render)


def render(report_json: Path) -> None:
    """(Re)build report.md and report.png beside a report.json."""
    data = json.loads(report_json.read_text())
    atomic_write(report_json.with_name("report.md"), markdown(data))
    plot(data, report_json.with_name("report.png"))
    plot_latency(data, report_json.with_name("report_latency.png"))
    if data.get("training", {}).get("loss_curve"):
        plot_training(data, report_json.with_name("report_training.png"))


def results_table(data: dict[str, Any]) -> str:
    """The variants side by side: the table the README and CI print."""
    rows = data["variants"]
    case = data["latency_case"]
    cases = list(rows[0]["latency_ms"])
    head = "| variant | accuracy % | Δ vs fp32 (pts) | MB | peak RSS MB | " + " | ".join(f"{c} p50 ms" for c in cases)
    head += f" | {case} vs PyTorch (range over rounds) |"
    lines = [head, "|" + " --- |" * (6 + len(cases))]
    for r in rows:
        mark = " **(shipped)**" if r["name"] == data["shipped"] else " *(peer)*" if r.get("peer") else ""
        lat = " | ".join(f"{r['latency_ms'][c]['p50']:.2f}" for c in cases)
        ratio = f"{r['latency_ratio_to_pytorch'][case]:.2f}x"
        ci = (r.get("latency_ratio_ci") or {}).get(case)
        if ci and r["name"] != BASELINE:
            ratio += f" ({ci[0]:.2f}–{ci[1]:.2f})"
        rss = f"{r['peak_rss_bytes'] / 1e6:.0f}" if r.get("peak_rss_bytes") else "?"
        lines.append(
            f"| {r['name']}{mark} | {r['accuracy'] * 100:.2f} | {(-r['accuracy_drop'] * 100) + 0.0:+.2f} | "
            f"{r['size_bytes'] / 1e6:.1f} | {rss} | {lat} | {ratio} |"
        )
    return "\n".join(lines)


def bundle_lines(data: dict[str, Any]) -> list[str]:
    contents = data.get("bundle_contents")
    if not contents:
        return []
    total = contents["bundle_bytes"] / 1e6
    out = ["", "## Bundle", "", f"`{data['bundle']}`: {total:.1f} MB in all."]
    if contents["forms"]:
        out[-1] += " An app ships one form:"
        out += ["", "| form | files | MB |", "| --- | --- | --- |"]
    for name, form in contents["forms"].items():
        out.append(f"| {name} | {', '.join(form['files'])} | {form['bytes'] / 1e6:.1f} |")
    strings = contents.get("strings_model")
    if strings:
        out += [
            "",
            f"Strings-in model (`{strings['file']}`, tokenizer in the graph): accuracy "
            f"{100 * strings['accuracy']:.2f}% on {strings['eval_rows']} eval rows; same label as model.onnx on "
            f"{strings['agrees_with_model_onnx']}.",
        ]
    app = contents.get("app_start")
    if app:
        goals = app["goals"]
        out += [
            "",
            f"App start through `Predictor` ({app['runtime']}, median of {app['processes']} fresh processes): load + "
            f"first prediction {app['cold_start_seconds']:.2f} s (goal {goals['cold_start_seconds']:.1f} s), peak "
            f"RSS {app['peak_rss_bytes'] / 1e6:.0f} MB (goal {goals['peak_rss_bytes'] / 1e6:.0f} MB); reported, not "
            "gated.",
        ]
    return out


def target_lines(data: dict[str, Any]) -> list[str]:
    targets = data.get("targets")
    if not targets:
        return []
    out = ["", "## Targets", ""]
    out += [f"- {t}: measured" for t in targets.get("measured", [])]
    out += [f"- {t}: skipped: {why}" for t, why in targets.get("skipped", {}).items()]
    for target, rows in (targets.get("results") or {}).items():
        out += ["", f"### {target} (ONNX variants; accuracy is the CPU's)", "", "| variant | case | p50 ms | p90 ms |"]
        out.append("| --- | --- | --- | --- |")
        for name, cases in rows.items():
            out += [f"| {name} | {c} | {s['p50']:.2f} | {s['p90']:.2f} |" for c, s in cases.items()]
    return out


# long: report.md section by section, in the order a reader meets them
def markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    rows = data["variants"]
    out = [
        f"# Report: {data['recipe']}",
        "",
        f"Shipped: **{data['shipped'] or 'nothing (no variant met the budget)'}**"
        + (f" → `{data['bundle']}`" if data.get("bundle") else ""),
        "",
        f"Eval: `{data['data']['eval']}` ({data['data']['eval_rows']} rows). Train: `{data['data']['train']}` "
        f"({data['data']['train_rows']} rows, {data['finetune']['method']}, "
        f"{data['finetune'].get('train_seconds', 0):.0f} s).",
        "",
        f"Labels (output order): {', '.join(data['data']['labels'])} ({data['data']['labels_from']}).",
        "",
        *_distill_lines(data),
        "## Variants",
        "",
        results_table(data),
        "",
        "Latency: median (p50) of repeated runs after warm-up, "
        f"{env['threads']} intra-op threads. `bB_sN`: batch B of N tokens; `bB_real`: eval rows at their own length. "
        f"Measured in {data.get('rounds') or 1} round(s), each variant in a fresh process per round (rotating "
        "order); the range after a ratio is the smallest and largest of its per-round ratios (with 5 rounds it holds "
        "the median ratio with 94% probability). Distributions: `report_latency.png`.",
        *peer_comparison(data),
        *target_lines(data),
        *bundle_lines(data),
        "",
        "## Latency percentiles (ms)",
        "",
        "| variant | case | p50 | p90 | p99 | p50 95% CI | cv | runs | items/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for c, s in r["latency_ms"].items():
            lo, hi = s["p50_ci95"]
            out.append(
                f"| {r['name']} | {c} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | "
                f"{lo:.2f}–{hi:.2f} | {s['cv']:.3f} | {s['n']} | {s['items_per_second']:.1f} |"
            )
    if data.get("training", {}).get("validation_curve"):
        val = data["training"]["validation_curve"]
        best = max(val, key=lambda p: p["accuracy"])
        out += [
            "",
            "## Fine-tuning",
            "",
            f"Validation accuracy every {val[0]['step']} steps; the best, "
            f"{best['accuracy'] * 100:.2f}% at step {best['step']}, was kept. Curve: `report_training.png`.",
            "",
            "| step | validation accuracy % |",
            "| --- | --- |",
        ]
        out += [f"| {p['step']} | {p['accuracy'] * 100:.2f} |" for p in val]
    out += ["", "## Choice", "", f"Budget: {json.dumps(data['budget'])}", "", "| variant | verdict |", "| --- | --- |"]
    out += [f"| {name} | {verdict} |" for name, verdict in data["verdicts"].items()]
    front = data.get("pareto_front") or pareto_front(rows, data["latency_case"])
    out += [
        "",
        f"Pareto front (no other variant is both faster at {data['latency_case']} and more accurate), fastest first: "
        + ", ".join(f"`{n}`" for n in front)
        + ". Plot: `report.png`.",
    ]
    best = data.get("best_by_target") or {}
    if best:
        out += [
            "",
            "Best within the budget for each runtime an app could use: "
            + "; ".join(f"{t}: `{n}`" if n else f"{t}: none" for t, n in best.items())
            + f" (shipped for budget.target {data['budget'].get('target', 'onnxruntime')}).",
        ]
    out += _sensitivity_lines(rows)
    out += [
        "",
        "## Where accuracy went (predictions that differ from PyTorch fp32)",
        "",
        "| variant | changed rows | broken (fp32 right, variant wrong) | fixed | both wrong |",
        "| --- | --- | --- | --- | --- |",
    ]
    changed = [r for r in rows if r.get("changed_vs_fp32")]
    for r in changed:
        c = r["changed_vs_fp32"]
        out.append(f"| {r['name']} | {c['changed']} | {c['broken']} | {c['fixed']} | {c['other']} |")
    for r in changed:
        c = r["changed_vs_fp32"]
        if r["format"] == "onnx" and r["precision"] != "fp32" and c["rows"]:
            out += [
                "",
                f"`{r['name']}`, first {min(10, len(c['rows']))} of {c['changed']} changed rows:",
                "",
                "| row | text | label | fp32 (conf) | variant (conf) |",
                "| --- | --- | --- | --- | --- |",
            ]
            for x in c["rows"][:10]:
                text = x["text"].replace("|", "\\|")
                text = text if len(text) <= 90 else text[:87] + "..."
                out.append(
                    f"| {x['row']} | {text} | {x['label']} | {x['fp32']} ({x['fp32_confidence']:.2f}) | "
                    f"{x['variant']} ({x['variant_confidence']:.2f}) |"
                )
    out += [
        "",
        "## Memory and load (each variant in a fresh process)",
        "",
        "| variant | file MB | peak RSS MB | load + first result s |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.get("peak_rss_bytes"):
            out.append(
                f"| {r['name']} | {r['size_bytes'] / 1e6:.1f} | {r['peak_rss_bytes'] / 1e6:.0f} | "
                f"{r['cold_start_seconds']:.2f} |"
            )
    out += [
        "",
        "## Parity with PyTorch (parity rows of the eval split)",
        "",
        "| variant | max abs logit diff | argmax agreement |",
        "| --- | --- | --- |",
    ]
    for r in rows:
        if r.get("parity"):
            out.append(f"| {r['name']} | {r['parity']['max_abs_diff']:.2e} | {r['parity']['argmax_agreement']:.4f} |")
    fused = [(r["name"], r["compression"]["fusions"]) for r in rows if (r.get("compression") or {}).get("fusions")]
    if fused:
        out += ["", "## Graph fusions", ""] + [f"- {name}: {what}" for name, what in fused]
    out += ["", "## Stages", "", "| stage | status | seconds | id |", "| --- | --- | --- | --- |"]
    out += [f"| {s['key']} | {s['status']} | {s['seconds']:.1f} | {s['id']} |" for s in data["stages"]]
    out += [
        "",
        "## Environment",
        "",
        f"- CPU: {env['cpu_model']} ({env['cores_physical']} cores, flags: {', '.join(env['cpu_flags'])})",
        f"- Python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- git commit: {env['git_commit']} (latencies measured at {data.get('measured_at_commit') or 'unknown'})",
        "",
    ]
    return "\n".join(out)


def _sensitivity_lines(rows: list[dict[str, Any]], worst: int = 10) -> list[str]:
    out: list[str] = []
    for r in rows:
        comp = r.get("compression") or {}
        sens = comp.get("sensitivity")
        if not sens:
            continue
        excluded = set(comp.get("excluded") or [])
        out += [
            "",
            f"## Sensitivity: {r['name']}",
            "",
            f"Each of {sens['nodes']} quantizable nodes quantized alone, logits compared with the float graph on "
            f"{sens['rows']} rows of {sens['rows_from']}. The {min(worst, len(sens['worst']))} worst:",
            "",
            "| node | op | logit MSE | max abs diff | flipped rows | kept in float |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        out += [
            f"| `{w['node']}` | {w['op_type']} | {w['logit_mse']:.2e} | {w['max_abs_diff']:.3f} | {w['flips']} | "
            f"{'yes' if w['node'] in excluded else ''} |"
            for w in sens["worst"][:worst]
        ]
        auto = comp.get("auto")
        if auto:
            target = auto.get("target_flip_rate", auto.get("target_drop", 0.0))
            out += [
                "",
                f"`exclude: auto` on {auto['rows']} rows of {auto['rows_from']} (float graph "
                f"{auto['fp32_accuracy'] * 100:.2f}%, target: at most {target * 100:.2f}% of predictions changed): "
                + "; ".join(
                    f"{t['excluded']} in float → "
                    + (f"{t['flip_rate'] * 100:.2f}% changed, " if "flip_rate" in t else "")
                    + f"{t['accuracy'] * 100:.2f}% ({-t['drop'] * 100:+.2f})"
                    for t in auto["tries"]
                )
                + f". Kept {len(excluded)} node(s) in float.",
            ]
    return out


def _distill_lines(data: dict[str, Any]) -> list[str]:
    d = data.get("distill")
    if not d:
        return []
    s = d.get("settings") or {}
    return [
        f"Distilled: the ONNX variants come from a {len(d['kept_layers'])}-layer student (teacher layers "
        f"{d['kept_layers']} of {d['teacher_layers']}; {d['parameters'] / 1e6:.1f}M of "
        f"{d['teacher_parameters'] / 1e6:.1f}M parameters), trained {d.get('train_seconds', 0):.0f} s with "
        f"T={s.get('temperature')}, alpha={s.get('alpha')}, hidden_weight={s.get('hidden_weight')}, "
        f"attention_weight={s.get('attention_weight')}. `pytorch-fp32` is the teacher: accuracy drops and speed-ups "
        "are against it.",
        "",
    ]
