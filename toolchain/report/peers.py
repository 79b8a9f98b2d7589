"""The peers section of a classifier's report.md: the shipped variant against what other tools' documented defaults
make of the reference's weights (Optimum, OpenVINO, NNCF), metric by metric; in a distilled recipe those are the
teacher's, not the student's."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from toolchain.choose import OPENVINO_BF16, OPENVINO_NNCF, OPTIMUM_BASELINE, PEERS
from toolchain.evaluate.stats import ratio_interval


def peer_comparison(data: dict[str, Any]) -> list[str]:
    """The shipped variant against each peer (other tools' defaults on the same weights), metric by metric; each cell
    gives the peer's value and shipped / peer (the range of the per-round ratios for latency)."""
    by = {r["name"]: r for r in data["variants"]}
    ours = by.get(data.get("shipped") or "")
    peers = [by[name] for name in PEERS if name in by]
    if ours is None or not peers:
        return []
    meta = data.get("optimum_baseline") or {}
    weights = "the teacher's weights" if data.get("distill") else "the same weights"
    out = ["", f"## Against the peers ({weights}, each tool's documented defaults; never shipped)", ""]
    for r in peers:
        out.append(f"- `{r['name']}`: {PEER_METHODS[r['name']].format_map(defaultdict(lambda: '?', meta))}")
    if "O2" in (meta.get("failed_levels") or {}):
        out += [
            "",
            f"Optimum's recommended O2 could not be quantized by ORTQuantizer here ({meta['failed_levels']['O2']}; "
            "huggingface/optimum#1959), so its row is the O1 path a user falls back to.",
        ]
    out += [
        "",
        f"| metric | shipped `{ours['name']}` | " + " | ".join(f"`{r['name']}` (shipped / peer)" for r in peers) + " |",
        "| --- | --- | " + " | ".join("---" for _ in peers) + " |",
        f"| accuracy % | {ours['accuracy'] * 100:.2f} | "
        + " | ".join(f"{r['accuracy'] * 100:.2f} ({(ours['accuracy'] - r['accuracy']) * 100:+.2f} pts)" for r in peers)
        + " |",
    ]
    for c in ours["latency_ms"]:
        cells = []
        for r in peers:
            a, b = ours["latency_ms"][c]["p50"], r["latency_ms"][c]["p50"]
            ci_a, ci_b = (ours.get("round_p50") or {}).get(c), (r.get("round_p50") or {}).get(c)
            rng = ""
            if ci_a and ci_b:
                lo, hi = ratio_interval(ci_a, ci_b)
                rng = f", {lo:.2f}–{hi:.2f}"
            cells.append(f"{b:.2f} ({a / b:.2f}x{rng})")
        out.append(f"| p50 {c} ms | {ours['latency_ms'][c]['p50']:.2f} | " + " | ".join(cells) + " |")
    for key, label, scale, fmt in (
        ("peak_rss_bytes", "peak RSS MB", 1e-6, ".0f"),
        ("size_bytes", "file MB", 1e-6, ".1f"),
        ("cold_start_seconds", "load + first result s", 1.0, ".2f"),
    ):
        if ours.get(key):
            x = ours[key] * scale
            cells = [f"{r[key] * scale:{fmt}} ({x / (r[key] * scale):.2f}x)" if r.get(key) else "?" for r in peers]
            out.append(f"| {label} | {x:{fmt}} | " + " | ".join(cells) + " |")
    return out


PEER_METHODS = {
    OPTIMUM_BASELINE: "optimum export, ORTOptimizer {optimization}, ORTQuantizer dynamic int8 `{preset}` (onnxruntime)",
    OPENVINO_BF16: "the fp32 export run by OpenVINO with `INFERENCE_PRECISION_HINT: bf16`, `PERFORMANCE_HINT: "
    "LATENCY` (f32 on a CPU without bf16 support)",
    OPENVINO_NNCF: "`nncf.quantize` of the fp32 export (300 training rows, `ModelType.TRANSFORMER`), run by OpenVINO "
    "at its default precision",
}
