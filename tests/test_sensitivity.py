"""The sensitivity ranking and the `exclude: auto` search, on synthetic models (no onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.compile.sensitivity import Candidate, auto_exclude, rank_nodes

REFERENCE = np.array([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.0], [0.1, 0.3]])
# How much quantizing each node alone disturbs the logits.
NOISE = {"a": 0.01, "b": 0.8, "c": 0.0, "d": 0.3}


def builder(nodes: list[str]):
    """A stand-in for a quantizer: the 'model' is the list of quantized nodes."""

    def build(only: list[str] | None = None, exclude: list[str] | None = None) -> Path:
        quantized = only if only is not None else [n for n in nodes if n not in (exclude or [])]
        return Path("+".join(sorted(quantized)) or "float")

    return build


fake_build = builder(list(NOISE))


def fake_logits(model: Path) -> np.ndarray:
    nodes = [] if model.name == "float" else model.name.split("+")
    shift = sum(NOISE[n] for n in nodes)
    return REFERENCE + np.array([[-shift, shift]] * len(REFERENCE))


def test_rank_orders_nodes_by_their_own_output_error() -> None:
    ranking = rank_nodes([Candidate(n, "MatMul") for n in NOISE], fake_build, fake_logits, REFERENCE)
    assert [r["node"] for r in ranking] == ["b", "d", "a", "c"]
    assert ranking[0]["logit_mse"] == np.float64(0.8**2)
    assert ranking[-1]["logit_mse"] == 0.0 and ranking[-1]["flips"] == 0
    assert ranking[0]["flips"] == 1  # row 1 (0.5 vs 0.2) crosses over once b shifts the logits by 0.8


def accuracy_of(drops: dict[str, float], base: float = 0.9):
    """Accuracy falls by drops[n] for every quantized node n."""

    def measure(model: Path) -> dict[str, float]:
        nodes = [] if model.name == "float" else model.name.split("+")
        return {"drop": sum(drops[n] for n in nodes) + (0.9 - base)}

    return measure


RANKING = [{"node": n} for n in ["b", "d", "a", "c"]]


def test_auto_exclude_keeps_the_fewest_worst_nodes_in_float() -> None:
    acc = accuracy_of({"b": 0.02, "d": 0.006, "a": 0.001, "c": 0.0})
    excluded, tries = auto_exclude(RANKING, fake_build, acc, 0.005, key="drop")
    assert excluded == ["b", "d"]  # b alone leaves 0.007 > 0.005; b and d leave 0.001
    assert [t["excluded"] for t in tries] == [0, 1, 2]
    assert tries[2]["drop"] < 2e-3


def test_auto_exclude_quantizes_everything_when_the_target_is_already_met() -> None:
    excluded, tries = auto_exclude(RANKING, fake_build, accuracy_of(dict.fromkeys("abcd", 0.0)), 0.005, key="drop")
    assert excluded == [] and len(tries) == 1


def test_auto_exclude_bisects_between_the_last_miss_and_the_first_hit() -> None:
    ranking = [{"node": f"n{i}"} for i in range(20)]
    drops = {f"n{i}": (0.01 if i < 5 else 0.0) for i in range(20)}  # five bad nodes at the top
    excluded, tries = auto_exclude(ranking, builder(list(drops)), accuracy_of(drops), 0.0, key="drop")
    assert len(excluded) == 5
    assert [t["excluded"] for t in tries] == [0, 1, 2, 4, 5, 6, 8]


def test_auto_exclude_returns_the_best_try_when_the_target_cannot_be_met() -> None:
    # float itself scores below fp32 on these rows (a stand-in for a target no exclusion reaches)
    measure = accuracy_of(dict.fromkeys("abcd", 0.01), base=0.85)
    excluded, tries = auto_exclude(RANKING, fake_build, measure, 0.0, key="drop")
    assert excluded == ["b", "d", "a", "c"] and tries[-1]["excluded"] == 4
