"""Choosing the variant to ship: among the ONNX variants that meet every budget of the recipe, the fastest, unless
another one's latency range overlaps the fastest's (the two are as fast within the measured noise): then the more
accurate of those, then the smaller. Peers (other tools' defaults on the same weights) are compared, never shipped.
Also the Pareto front of accuracy against latency that the report draws."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from toolchain.core.task import Choice
from toolchain.recipe.schema import BudgetSection
from toolchain.report.rows import ClassifierRow

BASELINE = "pytorch-fp32"
OPTIMUM_BASELINE = "optimum-int8-dynamic"
OPENVINO_BF16 = "openvino-bf16"
OPENVINO_NNCF = "openvino-nncf-int8"
RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "openvino": "openvino"}  # the runtime each variant format runs on
PEERS = {
    OPTIMUM_BASELINE: "Optimum's default path",
    OPENVINO_BF16: "OpenVINO's bf16 inference",
    OPENVINO_NNCF: "NNCF's default int8 path",
}


def choice_table(choice: Choice[ClassifierRow]) -> str:
    """The variants with accuracy, latency at the choice's case, size and verdict (for a budget nothing meets)."""
    case = choice.latency_case
    lines = [
        f"| variant | accuracy | drop (pts) | p50 {case} ms | speed-up vs PyTorch | MB | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in choice.rows:
        ratio = r["latency_ratio_to_pytorch"].get(case)
        lines.append(
            f"| {r['name']} | {r['accuracy'] * 100:.2f} | {r['accuracy_drop'] * 100:+.2f} | "
            f"{r['latency_ms'][case]['p50']:.2f} | {f'{1 / ratio:.2f}x' if ratio else '?'} | "
            f"{r['size_bytes'] / 1e6:.1f} | {choice.verdicts.get(r['name'], '')} |"
        )
    return "\n".join(lines)


R = TypeVar("R", bound=ClassifierRow)


def choose_variant(
    rows: list[R], budget: BudgetSection, metric: str = "accuracy", resolution: float = 0.0
) -> Choice[R]:
    """`metric`: what the rows' `accuracy` holds, as the verdicts name it; `resolution`: the difference in it (0-1
    scale) below which two variants are as accurate (0: exact, as for counts of right answers)."""
    case = budget.latency_case
    choice = Choice(shipped=None, latency_case=case, rows=rows)
    qualified: list[R] = []
    for r in rows:
        reasons = []
        if r.get("reference"):
            choice.verdicts[r["name"]] = "reference (measured, not a candidate)"
            continue
        if r["name"] in PEERS:
            choice.verdicts[r["name"]] = (
                f"peer: what {PEERS[r['name']]} makes from the reference's weights (never shipped)"
            )
            continue
        if r["format"] == "pytorch":
            choice.verdicts[r["name"]] = "baseline (not shippable: the bundle runs without torch)"
            continue
        if RUNTIME_OF_FORMAT.get(r["format"]) != budget.target:
            choice.verdicts[r["name"]] = (
                f"runs on {RUNTIME_OF_FORMAT.get(r['format'], r['format'])}, not on budget.target {budget.target}"
            )
            continue
        drop = r["accuracy_drop"]
        # Accuracy is a count over the eval rows: compare in rows, not in floats, so 1 row == 1 row.
        if drop > budget.max_accuracy_drop + 1e-9:
            reasons.append(f"{metric} drop {drop * 100:.2f} pts > budget {budget.max_accuracy_drop * 100:.2f}")
        p50 = r["latency_ms"][case]["p50"]
        if budget.max_latency_ms is not None and p50 > budget.max_latency_ms:
            reasons.append(f"p50 {p50:.2f} ms > budget {budget.max_latency_ms:.2f} ms")
        ratio = r["latency_ratio_to_pytorch"].get(case)
        if budget.min_speedup is not None and ratio is not None and 1 / ratio < budget.min_speedup:
            reasons.append(f"speed-up {1 / ratio:.2f}x over PyTorch < budget {budget.min_speedup:.2f}x")
        mb = r["size_bytes"] / 1e6
        if budget.max_size_mb is not None and mb > budget.max_size_mb:
            reasons.append(f"size {mb:.1f} MB > budget {budget.max_size_mb:.1f} MB")
        if reasons:
            choice.verdicts[r["name"]] = "rejected: " + "; ".join(reasons)
        else:
            qualified.append(r)
    if not qualified:
        return choice
    qualified.sort(key=lambda r: (r["latency_ms"][case]["p50"], r["size_bytes"]))
    fastest = qualified[0]
    tied = [r for r in qualified if latency_range(r, case)[0] <= latency_range(fastest, case)[1]]
    # the same eval rows for every variant: accuracy orders them as the count of right answers would; a metric that
    # is no count (Spearman) is as good within `resolution` of the best
    top = max(r["accuracy"] for r in tied)
    as_good = [r for r in tied if r["accuracy"] >= top - resolution - 1e-12]
    best = min(as_good, key=lambda r: (r["size_bytes"], r["latency_ms"][case]["p50"]))
    choice.shipped = best["name"]
    shown = {r["name"]: f"{r['latency_ms'][case]['p50']:.2f} ms" for r in qualified}
    within = f" (within {resolution * 100:.2f} pts)" if resolution else ""
    for r in qualified:
        if r is best:
            why = "fastest" if r is fastest else f"as fast as {fastest['name']} within the rounds' range, more accurate"
            if r is not fastest and any(f is fastest for f in as_good):
                why = f"as fast as {fastest['name']} within the rounds' range, as accurate{within}, smaller"
            choice.verdicts[r["name"]] = f"shipped: {why} within budget at {case}"
        elif any(r is t for t in tied):
            choice.verdicts[r["name"]] = (
                f"within budget, as fast as {best['name']} within the rounds' range ({shown[r['name']]} vs "
                f"{shown[best['name']]}), but less accurate or larger"
            )
        else:
            choice.verdicts[r["name"]] = (
                f"within budget, slower than {best['name']} ({shown[r['name']]} vs {shown[best['name']]})"
            )
    return choice


def latency_range(r: ClassifierRow, case: str) -> tuple[float, float]:
    """The lowest and highest per-round p50 at `case` (the p50 alone when there are no rounds)."""
    rounds = r.get("round_p50", {}).get(case) or [r["latency_ms"][case]["p50"]]
    return min(rounds), max(rounds)


def pareto_front(rows: Sequence[ClassifierRow], case: str) -> list[str]:
    """Names of the variants no other variant beats on both accuracy and p50 latency at `case` (ties kept),
    fastest first."""
    front = []
    for r in rows:
        lat, acc = r["latency_ms"][case]["p50"], r["accuracy"]
        dominated = any(
            o is not r
            and o["latency_ms"][case]["p50"] <= lat
            and o["accuracy"] >= acc
            and (o["latency_ms"][case]["p50"] < lat or o["accuracy"] > acc)
            for o in rows
        )
        if not dominated:
            front.append(r)
    return [r["name"] for r in sorted(front, key=lambda r: r["latency_ms"][case]["p50"])]
