"""The generation recipe's report: report.json (every number), report.md (for people and CI), report.png."""

from __future__ import annotations

import json
import statistics
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
        "bench": {"threads": bench["threads"], "rounds": bench["rounds"], "passes": bench.get("passes", 1)},
        "peers": peer_comparison(rows, choice.shipped),
        "skipped": dict(ctx.skipped),
        "training": {"loss_curve": json.loads(train_log.read_text()).get("loss_curve", [])}
        if train_log.is_file()
        else {},
    }
    return save_report(ctx, data, render)


def peer_comparison(rows: Sequence[Mapping[str, Any]], shipped: str | None) -> dict[str, dict[str, Any]]:
    """The shipped decoder against each peer row: decode tokens/s shipped / peer in each round (each round times every
    variant once, in a fresh process, so round i of both ran side by side), their median and lowest; accuracy and
    time to first token beside."""
    ship = next((r for r in rows if r["name"] == shipped), None)
    if ship is None or "decode_tokens_per_second_rounds" not in ship:
        return {}
    out = {}
    for r in rows:
        if not r.get("peer") or "decode_tokens_per_second_rounds" not in r:
            continue
        pairs = zip(ship["decode_tokens_per_second_rounds"], r["decode_tokens_per_second_rounds"], strict=True)
        ratios = [a / b for a, b in pairs]
        out[r["name"]] = {
            "decode_ratio_rounds": ratios,
            "decode_ratio_median": float(statistics.median(ratios)),
            "decode_ratio_lowest": min(ratios),
            "accuracy_diff_points": 100 * (ship["accuracy"] - r["accuracy"]),
            "ttft_ms_p50": {"shipped": ship["ttft_ms"]["p50"], "peer": r["ttft_ms"]["p50"]},
            "size_bytes": {"shipped": ship["size_bytes"], "peer": r["size_bytes"]},
        }
    return out


def peers_section(data: dict[str, Any]) -> list[str]:
    peers, skipped = data.get("peers") or {}, data.get("skipped") or {}
    if not peers and not skipped:
        return []
    out = [
        "## Against the peers",
        "",
        f"The shipped decoder ({data['shipped']}) against what each tool builds from the same tuned weights with its "
        "defaults, fed the same prompt ids, timed in the same rounds:",
        "",
        "| peer | shipped / peer decode tokens/s, median (lowest) round | accuracy Δ (pts, shipped − peer) | "
        "TTFT p50 ms shipped / peer | MB shipped / peer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, p in peers.items():
        out.append(
            f"| {name} | {p['decode_ratio_median']:.2f}x ({p['decode_ratio_lowest']:.2f}x) | "
            f"{p['accuracy_diff_points']:+.2f} | {p['ttft_ms_p50']['shipped']:.0f} / {p['ttft_ms_p50']['peer']:.0f} | "
            f"{p['size_bytes']['shipped'] / 1e6:.1f} / {p['size_bytes']['peer'] / 1e6:.1f} |"
        )
    out += [f"- {name}: skipped: {why}" for name, why in skipped.items()]
    return [*out, ""]


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
    groups: dict[str, set[Any]] = {}
    for r in rows:
        kind = "peers" if r.get("peer") else "PyTorch" if r["format"] == "pytorch" else "ONNX"
        groups.setdefault(kind, set()).add(r.get("eval_batch_size"))
    if any(None in b or len(b) != 1 for b in groups.values()):
        return ""
    prefix = max((r.get("prefix_tokens") or 0 for r in rows), default=0)
    ways = []
    for kind, batch in groups.items():
        size = batch.pop()
        how = f"{size} prompts per batch" if size > 1 else "one prompt at a time"
        if kind == "peers":
            how += ", each whole, through the peer's own runtime"
        ways.append(f"{kind}: {how}")
    shared = f"; the {prefix} tokens every prompt starts with run once and reused (not by peers)" if prefix else ""
    return f"Answers through the runtime's greedy loop ({'; '.join(ways)}){shared}."


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
        f"{data['bench']['rounds']} rounds, each variant in a fresh process per round"
        + (
            f" that times its prompts {data['bench']['passes']} times, its fastest pass counting"
            if data["bench"].get("passes", 1) > 1
            else ""
        )
        + "; decode tokens/s is the median of the rounds (range in brackets); TTFT is the prompt's forward pass. "
        "PyTorch is eager fp32 with its KV cache, the same greedy loop.",
        "",
        *peers_section(data),
        "## Verdicts",
        "",
        *[f"- {name}: {why}" for name, why in data["verdicts"].items()],
        "",
        "## Export and quantization",
        "",
        f"- Export ({_graph(data['export'])}): parity with PyTorch over the prompt and "
        f"{data['export']['parity']['steps']} decode steps: max |diff| {data['export']['parity']['max_abs_diff']:.2e}, "
        f"greedy tokens agree: {data['export']['parity']['greedy_agree']}.",
        *_quantize_lines(data),
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


def _graph(export: Mapping[str, Any]) -> str:
    graph = export.get("graph") or {"graph": "optimum"}
    if graph["graph"] == "fused":
        ops = graph["ops"]
        return (
            f"the toolchain's fused graph: {ops.get('GroupQueryAttention', 0)} GroupQueryAttention with rotary, "
            f"{ops.get('SkipSimplifiedLayerNormalization', 0)} fused residual + RMSNorm, merged q/k/v and gate/up "
            f"MatMuls ({ops.get('MatMul', 0)} in all), the last position's logits only"
        )
    why = f"; {graph['why']}" if graph.get("why") else ""
    return f"optimum text-generation-with-past{why}"


def _quantize_lines(data: dict[str, Any]) -> list[str]:
    """One line per quantized variant: the MatMuls quantized and at which bits, those left in float, the embedding."""
    return [
        f"- {key.removeprefix('llm-quantize.')}: {m['bits']}-bit MatMulNBits on {m['matmulnbits_nodes']} MatMuls"
        + (f" ({m['int8_weight_nodes']} of them 8-bit: {m['int8_nodes'][:3]}...)" if m.get("int8_weight_nodes") else "")
        + ", "
        f"{m['float_matmul_nodes']} left in float"
        + (
            ", the embedding read from the quantized LM head (GatherBlockQuantized: one table)"
            if m.get("embedding_shared_with_lm_head")
            else " (MatMuls without a constant weight: attention's scores and context, and a tied lm_head, which "
            "reads the embedding through a Transpose)"
        )
        + (f", excluded: {m['excluded']}" if m["excluded"] else "")
        + _rounding_and_head(m)
        + f"; {m['size_bytes'] / 1e6:.1f} MB."
        for key, m in data["quantize"].items()
    ]


def _rounding_and_head(m: dict[str, Any]) -> str:
    """How a variant's 4-bit weights were rounded (AWQ scaling, GPTQ) and the LM head's own block size, where it
    has them."""
    out = ""
    if m.get("awq"):
        a = m["awq"]
        out += (
            f", activation-aware (AWQ, {a['calibration_prompts']} calibration prompts: the projections' mean relative "
            f"output error {a['mean_relative_error_rtn']:.4f} rounded, {a['mean_relative_error_awq']:.4f} scaled and "
            "clipped)"
        )
    if m.get("gptq"):
        g = m["gptq"]
        out += (
            f", error-compensated rounding (GPTQ, {g['calibration_prompts']} calibration prompts, {g['projections']} "
            f"projections: mean relative output error {g['mean_relative_error_rtn']:.5f} rounded to nearest, "
            f"{g['mean_relative_error_gptq']:.5f} GPTQ)"
        )
    if m.get("block_size") and m.get("lm_head_block_size", m["block_size"]) != m["block_size"]:
        out += f", blocks of {m['block_size']} weights, the LM head's of {m['lm_head_block_size']}"
    return out
