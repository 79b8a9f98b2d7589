"""Choosing the variant to ship: the fastest ONNX variant that meets every budget of the recipe; and the Pareto
front of accuracy against latency that the report draws."""

from __future__ import annotations

from collections.abc import Sequence

from toolchain.core.task import Choice
from toolchain.recipe.schema import BudgetSection
from toolchain.report.rows import ClassifierRow

BASELINE = "pytorch-fp32"
OPTIMUM_BASELINE = "optimum-int8-dynamic"


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


def choose_variant(rows: list[ClassifierRow], budget: BudgetSection) -> Choice[ClassifierRow]:
    case = budget.latency_case
    choice = Choice(shipped=None, latency_case=case, rows=rows)
    qualified: list[ClassifierRow] = []
    for r in rows:
        reasons = []
        if r["format"] != "onnx":
            choice.verdicts[r["name"]] = "baseline (not shippable: the bundle is ONNX)"
            continue
        if r["name"] == OPTIMUM_BASELINE:
            choice.verdicts[r["name"]] = "reference: what Optimum's default path makes from the same weights"
            continue
        drop = r["accuracy_drop"]
        # Accuracy is a count over the eval rows: compare in rows, not in floats, so 1 row == 1 row.
        if drop > budget.max_accuracy_drop + 1e-9:
            reasons.append(f"accuracy drop {drop * 100:.2f} pts > budget {budget.max_accuracy_drop * 100:.2f}")
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
    qualified.sort(key=lambda r: (r["latency_ms"][case]["p50"], r["size_bytes"]))
    for rank, r in enumerate(qualified):
        if rank == 0:
            choice.shipped = r["name"]
            choice.verdicts[r["name"]] = f"shipped: fastest within budget at {case}"
        else:
            choice.verdicts[r["name"]] = (
                f"within budget, slower than {qualified[0]['name']} "
                f"({r['latency_ms'][case]['p50']:.2f} ms vs "
                f"{qualified[0]['latency_ms'][case]['p50']:.2f} ms)"
            )
    return choice


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
