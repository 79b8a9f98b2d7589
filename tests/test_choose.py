"""Choosing the variant to ship from synthetic rows."""

from __future__ import annotations

from toolchain.choose import choice_table, choose_variant
from toolchain.recipe.schema import BudgetSection


def row(name: str, fmt: str, acc: float, p50: float, mb: float, base_acc: float = 0.90) -> dict:
    return {
        "name": name,
        "format": fmt,
        "accuracy": acc,
        "correct": round(acc * 872),
        "accuracy_drop": base_acc - acc,
        "size_bytes": int(mb * 1e6),
        "latency_ms": {"b1_s128": {"p50": p50}},
        "latency_ratio_to_pytorch": {"b1_s128": p50 / 20.0},
    }


ROWS = [
    row("pytorch-fp32", "pytorch", 0.90, 20.0, 91),
    row("onnx-fp32", "onnx", 0.90, 19.0, 91),
    row("onnx-int8", "onnx", 0.895, 10.0, 23),
    row("onnx-int4", "onnx", 0.85, 8.0, 15),
]


def test_fastest_within_accuracy_budget_is_shipped() -> None:
    c = choose_variant(ROWS, BudgetSection(max_accuracy_drop=0.01))
    assert c.shipped == "onnx-int8"
    assert c.verdicts["onnx-int4"].startswith("rejected: accuracy drop 5.00 pts")
    assert "baseline" in c.verdicts["pytorch-fp32"]
    assert "slower than onnx-int8" in c.verdicts["onnx-fp32"]


def test_size_and_latency_budgets() -> None:
    c = choose_variant(ROWS, BudgetSection(max_accuracy_drop=0.1, max_size_mb=20))
    assert c.shipped == "onnx-int4"
    c = choose_variant(ROWS, BudgetSection(max_accuracy_drop=0.0, max_latency_ms=5))
    assert c.shipped is None
    table = choice_table(c)
    assert "onnx-fp32" in table and "p50 19.00 ms > budget 5.00 ms" in table


def test_exact_budget_edge_is_inclusive() -> None:
    rows = [row("pytorch-fp32", "pytorch", 0.90, 20, 91), row("q", "onnx", 0.89, 10, 23)]
    assert choose_variant(rows, BudgetSection(max_accuracy_drop=0.01)).shipped == "q"


def test_changed_predictions_counts_by_direction() -> None:
    from toolchain.tasks.classification import changed_predictions

    labels = [0, 1, 1, 0, 2]
    base = {"predictions": [0, 1, 0, 1, 2], "confidences": [0.9, 0.8, 0.6, 0.7, 0.99]}
    other = {"predictions": [1, 1, 1, 2, 2], "confidences": [0.55, 0.8, 0.51, 0.5, 0.98]}
    c = changed_predictions(base, other, ["a", "b", "c", "d", "e"], labels, ["x", "y", "z"])
    assert (c["broken"], c["fixed"], c["other"], c["changed"]) == (1, 1, 1, 3)
    assert [r["row"] for r in c["rows"]] == [0, 2, 3]
    assert c["rows"][0] == {
        "row": 0,
        "direction": "broken",
        "text": "a",
        "label": "x",
        "fp32": "x",
        "fp32_confidence": 0.9,
        "variant": "y",
        "variant_confidence": 0.55,
    }


def test_speedup_budget_is_a_ratio_to_pytorch_in_the_same_run() -> None:
    rows = [dict(r) for r in ROWS]
    for r in rows:
        r["latency_ratio_to_pytorch"] = {"b1_s128": r["latency_ms"]["b1_s128"]["p50"] / 20.0}
    c = choose_variant(rows, BudgetSection(max_accuracy_drop=0.1, min_speedup=2.2))
    assert c.shipped == "onnx-int4"  # 20 / 8 = 2.5x
    assert "speed-up 2.00x over PyTorch < budget 2.20x" in c.verdicts["onnx-int8"]
    c = choose_variant(rows, BudgetSection(max_accuracy_drop=0.1, min_speedup=3.0))
    assert c.shipped is None and "2.50x" in choice_table(c)


def test_pareto_front_drops_dominated_variants() -> None:
    from toolchain.choose import pareto_front

    rows = [*ROWS, row("slow-and-bad", "onnx", 0.80, 30.0, 10), row("tie", "onnx", 0.895, 10.0, 23)]
    # onnx-fp32 (0.90 at 19 ms) dominates pytorch-fp32 (0.90 at 20 ms); equal points both stay
    assert pareto_front(rows, "b1_s128") == ["onnx-int4", "onnx-int8", "tie", "onnx-fp32"]


def _with_rounds(r: dict, rounds: list[float], correct: int) -> dict:
    return r | {"round_p50": {"b1_s128": rounds}, "correct": correct}


def test_overlapping_latency_ranges_ship_the_more_accurate_then_the_smaller() -> None:
    """Two variants as fast as each other within the rounds' range: the choice stops picking by noise (the QAT Q/DQ
    graph was shipped over a smaller, more accurate dynamic int8 for being 0.1 ms faster)."""
    qdq = _with_rounds(row("onnx-qat-qdq", "onnx", 0.8739, 6.25, 59.3, base_acc=0.8773), [6.1, 6.25, 6.5], 762)
    dyn = _with_rounds(row("onnx-int8-dynamic", "onnx", 0.8773, 6.35, 23.0, base_acc=0.8773), [6.2, 6.35, 6.6], 765)
    slow = _with_rounds(row("onnx-fp32", "onnx", 0.8773, 12.0, 91.0, base_acc=0.8773), [11.8, 12.0, 12.3], 765)
    base = _with_rounds(row("pytorch-fp32", "pytorch", 0.8773, 20.0, 91.0, base_acc=0.8773), [20.0, 20.0, 20.0], 765)
    c = choose_variant([base, qdq, dyn, slow], BudgetSection(max_accuracy_drop=0.01))
    assert c.shipped == "onnx-int8-dynamic"
    assert "more accurate" in c.verdicts["onnx-int8-dynamic"]
    assert c.verdicts["onnx-qat-qdq"].startswith("within budget, as fast as onnx-int8-dynamic")
    assert c.verdicts["onnx-fp32"].startswith("within budget, slower than onnx-int8-dynamic")
    # as accurate: the smaller ships
    same = _with_rounds(row("onnx-int8-dynamic", "onnx", 0.8739, 6.35, 23.0, base_acc=0.8773), [6.2, 6.35, 6.6], 762)
    assert choose_variant([base, qdq, same], BudgetSection(max_accuracy_drop=0.01)).shipped == "onnx-int8-dynamic"
    # ranges apart: the faster ships even when less accurate
    apart = _with_rounds(row("onnx-int8-dynamic", "onnx", 0.8773, 7.5, 23.0, base_acc=0.8773), [7.3, 7.5, 7.8], 765)
    assert choose_variant([base, qdq, apart], BudgetSection(max_accuracy_drop=0.01)).shipped == "onnx-qat-qdq"


def test_peers_are_never_shipped() -> None:
    fast_peer = row("openvino-nncf-int8", "openvino", 0.90, 1.0, 10, base_acc=0.8773)
    c = choose_variant([*ROWS, fast_peer], BudgetSection(max_accuracy_drop=0.01))
    assert c.shipped == "onnx-int8" and c.verdicts["openvino-nncf-int8"].startswith("peer: ")


def test_a_metric_that_is_no_count_ties_within_its_resolution() -> None:
    """Spearman 89.32 vs 89.28 on the same pairs is noise: with overlapping latency ranges the smaller ships; a
    difference beyond the resolution still ships the more accurate."""

    def ranged(name: str, acc: float, p50: float, mb: float, rounds: list[float]) -> dict:
        return row(name, "onnx", acc, p50, mb, base_acc=0.8931) | {"round_p50": {"b1_s128": rounds}, "correct": None}

    base = row("pytorch-fp32", "pytorch", 0.8931, 20.0, 91, base_acc=0.8931)
    big = ranged("int8-matmul", 0.8932, 0.74, 66.5, [0.6, 0.9])
    small = ranged("int8", 0.8928, 0.43, 22.8, [0.4, 0.7])
    c = choose_variant([base, big, small], BudgetSection(max_accuracy_drop=0.005), "Spearman", resolution=0.001)
    assert c.shipped == "int8" and c.verdicts["int8"] == "shipped: fastest within budget at b1_s128"
    c = choose_variant([base, big, small], BudgetSection(max_accuracy_drop=0.005), "Spearman", resolution=0.0)
    assert c.shipped == "int8-matmul"
    assert c.verdicts["int8-matmul"].startswith("shipped: as fast as int8 within the rounds' range, more accurate")
    bigger = ranged("int8-far", 0.8950, 0.74, 66.5, [0.6, 0.9])
    c = choose_variant([base, bigger, small], BudgetSection(max_accuracy_drop=0.005), "Spearman", resolution=0.001)
    assert c.shipped == "int8-far"
