"""The classification report's pictures: accuracy against latency (report.png), every variant's latency samples
(report_latency.png), the training curves (report_training.png)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from toolchain.choose import BASELINE, pareto_front


def plot(data: dict[str, Any], path: Path) -> None:
    """Accuracy against p50 latency: every variant, the Pareto front as a line, the shipped one as a star,
    rejected variants hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case = data["latency_case"]
    rows = data["variants"]
    front = data.get("pareto_front") or pareto_front(rows, case)
    fig, ax = plt.subplots(figsize=(8, 5))
    pts = {r["name"]: (r["latency_ms"][case]["p50"], r["accuracy"] * 100) for r in rows}
    ax.plot([pts[n][0] for n in front], [pts[n][1] for n in front], "--", color="tab:gray", lw=1, label="Pareto front")
    for r in rows:
        x, y = pts[r["name"]]
        verdict = data["verdicts"].get(r["name"], "")
        if r["name"] == data["shipped"]:
            ax.scatter([x], [y], s=220, marker="*", color="tab:red", zorder=3, label="shipped")
        elif verdict.startswith("rejected"):
            ax.scatter([x], [y], s=45, facecolors="none", edgecolors="tab:blue", zorder=2)
        else:
            ax.scatter([x], [y], s=45, color="tab:blue" if r["format"] == "onnx" else "tab:orange", zorder=2)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    base = next((r for r in rows if r["name"] == BASELINE), None)
    budget = data["budget"]
    if base is not None:
        floor = (base["accuracy"] - budget["max_accuracy_drop"]) * 100
        ax.axhline(floor, color="tab:red", lw=0.8, alpha=0.6, label="accuracy budget")
    if budget.get("max_latency_ms"):
        ax.axvline(budget["max_latency_ms"], color="tab:purple", lw=0.8, alpha=0.6, label="latency budget")
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency, {case} (ms, log scale)")
    ax.set_ylabel("accuracy on eval split (%)")
    ax.set_title(f"{data['recipe']}: accuracy vs latency (hollow: rejected by the budget)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    _save_figure(fig, path)


def plot_latency(data: dict[str, Any], path: Path) -> None:
    """The distribution of every variant's latency samples, one box per variant and case (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["variants"] if r.get("latency_samples_ms")]
    if not rows:
        return
    cases = list(rows[0]["latency_samples_ms"])
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 0.45 * len(rows) + 1.8), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        ax.boxplot(
            [r["latency_samples_ms"][case] for r in rows],
            vert=False,
            showfliers=True,
            flierprops={"markersize": 2, "alpha": 0.4},
        )
        ax.set_yticks(range(1, len(rows) + 1), [r["name"] for r in rows] if ax is axes[0][0] else [""] * len(rows))
        ax.set_xscale("log")
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("ms (log)")
        ax.grid(alpha=0.3, which="both", axis="x")
    fig.suptitle(f"{data['recipe']}: latency samples per variant (box: quartiles, whiskers 1.5 IQR)", fontsize=10)
    _save_figure(fig, path)


def plot_training(data: dict[str, Any], path: Path) -> None:
    """Training loss and validation accuracy against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = data["training"]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [p["step"] for p in training["loss_curve"]]
    ax.plot(
        steps, [p["loss"] for p in training["loss_curve"]], color="tab:blue", label="training loss (mean of 50 steps)"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    if training["validation_curve"]:
        ax2 = ax.twinx()
        val = training["validation_curve"]
        ax2.plot([p["step"] for p in val], [p["accuracy"] * 100 for p in val], "o-", color="tab:orange")
        ax2.set_ylabel("validation accuracy (%)", color="tab:orange")
        best = max(val, key=lambda p: p["accuracy"])
        ax2.annotate(
            "best (kept)",
            (best["step"], best["accuracy"] * 100),
            textcoords="offset points",
            xytext=(-20, 8),
            fontsize=8,
        )
    ax.set_title(f"{data['recipe']}: fine-tuning ({data['finetune']['method']})")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
