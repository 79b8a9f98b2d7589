"""The generation recipe's report: report.json (every number), report.md (for people and CI), report.png."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.core.task import Choice
from toolchain.report.common import atomic_write, report_head, save_report
from toolchain.report.rows import GeneratorRow

if TYPE_CHECKING:
    from toolchain.core.context import RunContext

README_BLOCK = "llm-results"


def write(ctx: RunContext, rows: list[GeneratorRow], choice: Choice[GeneratorRow], bundle: Path | None) -> Path:
    """Write report.json, report.md and report.png into the run folder; returns the JSON path."""
    recipe = ctx.recipe
    g = recipe.generation
    assert g is not None
    bench = json.loads(ctx.artifacts["llm-bench"].file("bench.json").read_text())
    train_log = ctx.artifacts["llm-finetune"].file("train_log.json")
    data = {"kind": "generation"} | report_head(ctx, bench, ctx.artifacts["llm-finetune"].meta, rows, choice, bundle)
    data |= {
        "model": {"source": recipe.model.source, **ctx.artifacts["llm-base"].meta},
        "generation": g.model_dump(mode="json"),
        "export": ctx.artifacts["llm-export"].meta,
        "quantize": {k: a.meta for k, a in ctx.artifacts.items() if k.startswith("llm-quantize.")},
        "bench": {"threads": bench["threads"], "rounds": bench["rounds"]},
        "training": {"loss_curve": json.loads(train_log.read_text()).get("loss_curve", [])}
        if train_log.is_file()
        else {},
    }
    return save_report(ctx, data, render)


def render(report_json: Path) -> None:
    data = json.loads(report_json.read_text())
    atomic_write(report_json.with_name("report.md"), markdown(data))
    plot(data, report_json.with_name("report.png"))


def results_table(data: dict[str, Any]) -> str:
    return table(data["variants"], data.get("verdicts"))


def table(rows: Sequence[Mapping[str, Any]], verdicts: dict[str, str] | None = None) -> str:
    head = (
        "| variant | accuracy % | Δ vs tuned fp32 (pts) | unparsed | greedy agreement with onnx-fp32 | MB | "
        "peak RSS MB | TTFT p50 ms | decode tokens/s | decode vs PyTorch |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        agree = r.get("agreement_with_onnx_fp32")
        agree_s = (
            f"{agree['identical']}/{agree['prompts']} identical, {100 * agree['token_prefix_rate']:.1f}% tokens"
            if agree
            else ""
        )
        tps = r.get("decode_tokens_per_second")
        rounds = r.get("decode_tokens_per_second_rounds") or []
        spread = f" ({min(rounds):.1f}–{max(rounds):.1f})" if len(rounds) > 1 else ""
        name = r["name"] + (" **(shipped)**" if verdicts and verdicts.get(r["name"], "").startswith("shipped") else "")
        delta = 0.0 - 100 * r["accuracy_drop"] + 0.0  # + 0.0: no "-0.00" for the baseline itself
        lines.append(
            f"| {name} | {100 * r['accuracy']:.2f} | {delta:+.2f} | {r['unparsed']} | {agree_s} | "
            f"{r['size_bytes'] / 1e6:.1f} | "
            + (f"{r['peak_rss_bytes'] / 1e6:.0f} | " if "peak_rss_bytes" in r else " | ")
            + (f"{r['ttft_ms']['p50']:.0f} | " if "ttft_ms" in r else " | ")
            + (f"{tps:.1f}{spread} | " if tps else " | ")
            + (f"{r['decode_speedup']:.2f}x |" if "decode_speedup" in r else " |")
        )
    return "\n".join(lines)


def answer_method(rows: Sequence[Mapping[str, Any]]) -> str:
    """How the answers were generated (older reports lack the fields)."""
    batch = {r.get("eval_batch_size") for r in rows}
    prefix = {r.get("prefix_tokens") or 0 for r in rows}
    if None in batch or len(batch) != 1:
        return ""
    shared = f", the {max(prefix)} tokens every prompt starts with run once and reused" if max(prefix) else ""
    return f"PyTorch and ONNX through the runtime's greedy loop, {batch.pop()} prompts per batch{shared}."


def markdown(data: dict[str, Any]) -> str:
    g = data["generation"]
    ft = data["finetune"]
    env = data["environment"]
    rows = data["variants"]
    prompt_tokens = data["export"].get("prompt_tokens")
    out = [
        f"# Report: {data['recipe']}",
        "",
        f"Shipped: **{data['shipped']}** → `{data['bundle']}`"
        if data["shipped"]
        else "Shipped: nothing (see verdicts)",
        "",
        f"Model: `{data['model']['source']}` ({data['model'].get('source_file')}, {data['model'].get('parameters'):,} "
        "parameters, dequantized to fp32). "
        f"Eval: `{data['data']['eval']}` ({data['data']['eval_rows']} rows), accuracy from greedy answers read as the "
        f"first label word. Train: `{data['data']['train']}` ({data['data']['train_rows']} rows, {ft['method']}, "
        f"{ft.get('train_seconds', '?')} s).",
        "",
        "## Variants",
        "",
        table(rows, data["verdicts"]),
        "",
        f"Accuracy: {data['data']['eval_rows']} eval rows; the tuned variants generate at most {g['max_new_tokens']} "
        f"tokens, the untuned model {g['untuned_max_new_tokens']} (it answers in a sentence); "
        f"{answer_method(rows)} Agreement: the first "
        f"{g['agreement_prompts']} eval texts as plain-text prompts, {g['agreement_tokens']} greedy tokens each, "
        "against onnx-fp32's tokens (identical sequences; share of tokens before the first difference). "
        f"Timing: {data['bench']['threads']} threads, {g['bench_prompts']} eval prompts per round "
        f"({prompt_tokens or '?'}+ tokens), {g['bench_new_tokens']} new tokens each (end of turn ignored), "
        f"{data['bench']['rounds']} rounds, each variant in a fresh process per round; decode tokens/s is the median "
        "of the rounds (range in brackets); TTFT is the prompt's forward pass. PyTorch is eager fp32 with its KV "
        "cache, the same greedy loop.",
        "",
        "## Verdicts",
        "",
        *[f"- {name}: {why}" for name, why in data["verdicts"].items()],
        "",
        "## Export and quantization",
        "",
        f"- Export (optimum text-generation-with-past): parity with PyTorch over the prompt and "
        f"{data['export']['parity']['steps']} decode steps: max |diff| {data['export']['parity']['max_abs_diff']:.2e}, "
        f"greedy tokens agree: {data['export']['parity']['greedy_agree']}.",
        *[
            f"- {key.removeprefix('llm-quantize.')}: {m['bits']}-bit MatMulNBits on {m['matmulnbits_nodes']} MatMuls"
            + (
                f" ({m['int8_weight_nodes']} of them 8-bit: {m['int8_nodes'][:3]}...)"
                if m.get("int8_weight_nodes")
                else ""
            )
            + ", "
            f"{m['float_matmul_nodes']} left in float (MatMuls without a constant weight: attention's scores and "
            "context, and a tied lm_head, which reads the embedding through a Transpose)"
            + (f", excluded: {m['excluded']}" if m["excluded"] else "")
            + f"; {m['size_bytes'] / 1e6:.1f} MB."
            for key, m in data["quantize"].items()
        ],
        *_sensitivity(data),
        "",
        "## Environment",
        "",
        f"{env.get('cpu_model')}, {env.get('threads')} threads; "
        + ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items())),
        f"; commit `{(data.get('measured_at_commit') or env.get('git_commit') or '?')[:12]}`.",
        "",
        "## Stages",
        "",
        "| stage | status | seconds |",
        "| --- | --- | --- |",
        *[f"| {s['key']} | {s['status']} | {s['seconds']:.1f} |" for s in data["stages"]],
        "",
    ]
    return "\n".join(out)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["variants"] if "decode_tokens_per_second" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in rows]
    a.barh(names, [r["decode_tokens_per_second"] for r in rows], color="tab:blue")
    a.set_xlabel("decode tokens/s (median of rounds)")
    a.invert_yaxis()
    every = data["variants"]
    b.barh([r["name"] for r in every], [100 * r["accuracy"] for r in every], color="tab:green")
    b.set_xlabel(f"{data['data']['eval']} accuracy %")
    b.set_xlim(min(100 * r["accuracy"] for r in every) - 5, 100)
    b.invert_yaxis()
    fig.suptitle(f"{data['recipe']}: tokens/s and accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sensitivity(data: dict[str, Any]) -> list[str]:
    out = []
    for key, m in data["quantize"].items():
        ranking = m.get("sensitivity")
        if not ranking:
            continue
        out += [
            "",
            f"Projection sensitivity ({key.removeprefix('llm-quantize.')}): each group alone at {m['bits']} bits, "
            f"margin between the label words' first tokens on {ranking[0]['rows']} held-out prompts, against fp32:",
            "",
            "| projections | MatMuls | margin MSE | rows changing side |",
            "| --- | --- | --- | --- |",
            *[
                f"| `{r['group']}` | {r['nodes']} | {r['margin_mse']:.4f} | {r['rows_changing_side']} |"
                for r in ranking
            ],
        ]
    return out
