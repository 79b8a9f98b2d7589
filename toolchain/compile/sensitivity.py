"""Per-node quantization sensitivity, and `exclude: auto`.

Ranking: each candidate node is quantized alone (everything else stays float) and the model's logits on a few real
rows are compared with the fp32 graph's. The mean squared logit error is that node's own contribution to the
output error; the number of rows whose prediction flips is reported beside it.

`exclude: auto`: the most sensitive nodes are kept in float, k of them, for k = 0, 1, 2, 4, 8, ... until the share
of selection rows whose prediction differs from the float graph's (the flip rate) is within the target; the
smallest such k between the last two tries is then found by bisection. Every try is recorded (the report shows the
search). Flips, not the accuracy drop, because they bound the drop from above and show up on easy rows too: on
SST-2's held-out phrases static int8 changed 1.2% of predictions but moved accuracy by only 0.3 points, while on the
dev sentences it changed 3.4% and cost 1.8 points.

Both take the model-building and scoring as functions, so the rule is tested without onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("toolchain")

# build(only=[...]) quantizes only those nodes; build(exclude=[...]) quantizes all candidates but those.
Build = Callable[..., Path]
Logits = Callable[[Path], np.ndarray]


@dataclass(frozen=True)
class Candidate:
    name: str
    op_type: str


def rank_nodes(candidates: Sequence[Candidate], build: Build, logits: Logits, reference: np.ndarray) -> list[dict]:
    """Every candidate's own output error when it alone is quantized, worst first."""
    ref_pred = reference.argmax(-1)
    ranking = []
    for c in candidates:
        got = logits(build(only=[c.name]))
        ranking.append(
            {
                "node": c.name,
                "op_type": c.op_type,
                "logit_mse": float(np.mean((got - reference) ** 2)),
                "max_abs_diff": float(np.abs(got - reference).max()),
                "flips": int((got.argmax(-1) != ref_pred).sum()),
            }
        )
    ranking.sort(key=lambda r: (-r["logit_mse"], r["node"]))
    return ranking


def auto_exclude(
    ranking: list[dict],
    build: Build,
    measure: Callable[[Path], dict[str, float]],
    target: float,
    key: str = "flip_rate",
) -> tuple[list[str], list[dict[str, Any]]]:
    """The fewest most-sensitive nodes to keep in float so that measure(model)[key] <= target.

    Returns (nodes to exclude, the tries made, each with what `measure` returned). When even excluding every node
    misses the target, the try with the smallest value is returned."""
    order = [r["node"] for r in ranking]
    tries: dict[int, dict[str, Any]] = {}

    def attempt(k: int) -> bool:
        if k not in tries:
            tries[k] = {"excluded": k, **measure(build(exclude=order[:k]))}
            log.info(
                "quantize: %d most sensitive node(s) in float: %s",
                k,
                ", ".join(f"{n} {v:.4f}" for n, v in tries[k].items() if n != "excluded")
                + f" (target {key} {target:.4f})",
            )
        return tries[k][key] <= target + 1e-9

    k, low = 0, -1  # low: largest k known to miss the target
    while not attempt(k):
        low = k
        if k == len(order):
            best = min(tries.values(), key=lambda t: (t[key], t["excluded"]))
            return order[: best["excluded"]], sorted(tries.values(), key=lambda t: t["excluded"])
        k = min(len(order), max(1, 2 * k))
    high = k  # meets the target
    while high - low > 1:
        mid = (low + high) // 2
        if attempt(mid):
            high = mid
        else:
            low = mid
    return order[:high], sorted(tries.values(), key=lambda t: t["excluded"])
