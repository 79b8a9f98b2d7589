"""The CI regression gate: a run's report against a committed baseline.

Latency is compared as the ratio of each variant's p50 to PyTorch fp32 eager's p50 *in the same run*, so a slower or
busier machine does not fail the gate, and only beyond what the measured noise explains: a variant regresses on a
case when even the low end of its ratio's range this run (the smallest per-round ratio) is above the high end of the
baseline's range by more than `latency_tolerance`. Accuracy regresses when it falls more than `accuracy_tolerance`
below the baseline's. A variant of the baseline missing from the run fails the gate too (a renamed or dropped
variant must be re-baselined on purpose: `make bench-baseline`).

A ratio to PyTorch depends on the CPU's instruction set, not only on its speed: int8 kernels gain more from VNNI
or AMX than PyTorch's fp32 ones (measured on one commit, `onnx-int8-dynamic` at b1_real was 0.13x PyTorch on a
Xeon with VNNI, 0.18x on another CPU, 0.41x on an AVX2-only EPYC), and int8 rounding differs by ISA too (an int8
variant's accuracy moved by up to 0.7 points between two CPUs). So a baseline keeps one summary per CPU class
(model and ISA flags, `machine_class`); a run on a class it has is gated against that class's summary. A run on a new
class is gated against each class's summary with the cross-CPU tolerances (accuracy 1 point; ratios to the peer
that runs the same kernels, same runtime and precision, 25%: measured across two CPUs, the shipped int8 graph's
ratio to Optimum's moved by 14%) and passes if one of them passes; its ratios to PyTorch are shown, not gated.

A generation report (decoder LMs) is gated the same way on accuracy and on decode tokens/s as a ratio to PyTorch
eager in the same run (higher is better): it regresses when even the high end of this run's per-round ratios is
below the low end of the baseline's by more than `latency_tolerance`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from toolchain.choose import BASELINE
from toolchain.errors import ToolchainError
from toolchain.report.rows import (
    ClassifierRow,
    GateBaseline,
    GateSummary,
    GateVariant,
    GeneratorRow,
    PeerRatio,
    classifier_rows,
    gate_baseline,
    generator_rows,
    problems,
)

FORMAT_VERSION = 2
DEFAULT_ACCURACY_TOLERANCE = 0.005  # 0.5 points: about 4 rows of SST-2 dev
DEFAULT_LATENCY_TOLERANCE = 0.10  # 10% beyond the two ranges
CROSS_CPU_ACCURACY_TOLERANCE = 0.01  # int8 rounding differs by ISA (VNNI vs AVX2): measured up to 0.69 points
CROSS_CPU_LATENCY_TOLERANCE = 0.25  # a same-kernel ratio moved 14% between two CPUs
NOT_GATED = "not gated: baseline from another CPU"


class GateError(ToolchainError):
    """The run regressed against the baseline; the message is the table of what failed."""

    exit_code = 4


@dataclass
class Check:
    variant: str
    metric: str
    baseline: str
    current: str
    limit: str
    ok: bool

    def row(self) -> str:
        verdict = "ok" if self.ok else "**REGRESSION**"
        if self.limit == NOT_GATED:
            verdict = "-"
        return f"| {self.variant} | {self.metric} | {self.baseline} | {self.current} | {self.limit} | {verdict} |"


def machine_class(env: dict[str, Any]) -> str:
    """The CPU class a ratio to PyTorch holds for: the model name and the ISA flags the kernels pick from."""
    flags = env.get("cpu_flags")
    isa = " ".join(flags) if flags else ("flags not recorded" if flags is None else "no AVX2")
    return f"{env.get('cpu_model') or 'unknown CPU'} [{isa}]"


def summarize(report: dict[str, Any], where: Path | str = "report.json") -> GateSummary:
    """What a baseline keeps of a report: per variant, accuracy and each case's ratio to PyTorch with its range, and
    to its same-kernel peer (a generation report: decode tokens/s against PyTorch, with the per-round range)."""
    env = report["environment"]
    head: GateSummary = {
        "recipe": report["recipe"],
        "measured_at_commit": report.get("measured_at_commit"),
        "environment": {k: env.get(k) for k in ("cpu_model", "cpu_flags", "cores_physical", "threads", "versions")},
        "eval_rows": report["data"]["eval_rows"],
        "variants": {},
    }
    try:
        if report.get("kind") == "generation":
            rows = generator_rows().validate_python(report["variants"])
            pt = next((r for r in rows if r["name"] == BASELINE), None)
            head["kind"] = "generation"
            head["variants"] = {r["name"]: _generation_variant(r, pt) for r in rows}
            return head
        classifier = classifier_rows().validate_python(report["variants"])
    except ValidationError as e:
        raise ToolchainError(
            f"{where}: its variants are not report rows of this version ({problems(e)}); run the recipe again"
        ) from None
    for r in classifier:
        v: GateVariant = {
            "accuracy": r["accuracy"],
            "correct": r["correct"],
            "p50_ms": {c: s["p50"] for c, s in r["latency_ms"].items()},
            "ratio_to_pytorch": r["latency_ratio_to_pytorch"],
            "ratio_range": r["latency_ratio_ci"],
        }
        peer = same_kernel_peer(r, classifier)
        if peer is not None:
            v["vs_peer"] = peer_ratio(r, peer)
        head["variants"][r["name"]] = v
    return head


def same_kernel_peer(row: ClassifierRow, rows: list[ClassifierRow]) -> ClassifierRow | None:
    """The first peer (another tool's build of the same weights) on the same runtime at the same precision."""
    if row["peer"]:
        return None
    return next(
        (p for p in rows if p["peer"] and (p["format"], p["precision"]) == (row["format"], row["precision"])), None
    )


def peer_ratio(row: ClassifierRow, peer: ClassifierRow) -> PeerRatio:
    """p50 / the peer's p50 per case, and the range of the per-round ratios (rounds are interleaved, so round i of
    both ran at the same time)."""
    out: PeerRatio = {"peer": peer["name"], "ratio": {}, "range": {}}
    for case, stats in row["latency_ms"].items():
        theirs = peer["latency_ms"].get(case)
        if theirs is None:
            continue
        out["ratio"][case] = stats["p50"] / theirs["p50"]
        ours, peers = row["round_p50"].get(case, []), peer["round_p50"].get(case, [])
        per_round = [a / b for a, b in zip(ours, peers, strict=False)]
        out["range"][case] = [min(per_round), max(per_round)] if per_round else [out["ratio"][case]] * 2
    return out


def _generation_variant(row: GeneratorRow, pt: GeneratorRow | None) -> GateVariant:
    out: GateVariant = {"accuracy": row["accuracy"], "correct": row["correct"]}
    if "decode_speedup" in row and pt is not None and row["name"] != BASELINE:
        mine, theirs = row.get("decode_tokens_per_second_rounds", []), pt.get("decode_tokens_per_second_rounds", [])
        per_round = [a / b for a, b in zip(mine, theirs, strict=True)]
        out["decode_speedup"] = row["decode_speedup"]
        out["decode_speedup_range"] = [min(per_round), max(per_round)]
    return out


def compare(
    current: GateSummary,
    baseline: GateSummary,
    accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE,
    latency_tolerance: float = DEFAULT_LATENCY_TOLERANCE,
    same_cpu: bool = True,
) -> list[Check]:
    """Every check of the gate, in a stable order: per baseline variant, accuracy, the speed ratios to PyTorch (only
    when the baseline was measured on this run's CPU class, `same_cpu`), then the ratios to the same-kernel peer."""
    checks = []
    for name, base in baseline["variants"].items():
        cur = current["variants"].get(name)
        if cur is None:
            checks.append(Check(name, "present", "yes", "missing from this run", "must be present", False))
            continue
        floor = base["accuracy"] - accuracy_tolerance
        checks.append(
            Check(
                name,
                "accuracy %",
                f"{base['accuracy'] * 100:.2f}",
                f"{cur['accuracy'] * 100:.2f}",
                f">= {floor * 100:.2f}",
                cur["accuracy"] >= floor - 1e-12,
            )
        )
        if name == BASELINE:
            continue  # the ratios' denominator
        if "decode_speedup" in base:  # generation: higher is better
            checks.append(_decode_check(name, base, cur, latency_tolerance, same_cpu))
        for case, base_ratio in base.get("ratio_to_pytorch", {}).items():
            b_range = base.get("ratio_range", {}).get(case)
            c_ratio = cur.get("ratio_to_pytorch", {}).get(case)
            c_range = cur.get("ratio_range", {}).get(case)
            checks.append(
                _ratio_check(
                    name, f"{case} p50 vs PyTorch", base_ratio, b_range, c_ratio, c_range, latency_tolerance, same_cpu
                )
            )
        if "vs_peer" in base:
            bp, cp = base["vs_peer"], cur.get("vs_peer")
            for case, base_ratio in bp["ratio"].items():
                metric = f"{case} p50 vs {bp['peer']}"
                if cp is None or cp["peer"] != bp["peer"]:
                    checks.append(Check(name, metric, f"{base_ratio:.3f}x", "peer missing", "", False))
                    continue
                checks.append(
                    _ratio_check(
                        name,
                        metric,
                        base_ratio,
                        bp["range"].get(case),
                        cp["ratio"].get(case),
                        cp["range"].get(case),
                        latency_tolerance,
                        True,
                    )
                )
    return checks


def _ratio_check(
    name: str,
    metric: str,
    base_ratio: float,
    b_range: list[float] | None,
    c_ratio: float | None,
    c_range: list[float] | None,
    tolerance: float,
    gated: bool,
) -> Check:
    """Lower is better: fails when even this run's best round is above the baseline's worst by more than tolerance."""
    b_lo, b_hi = b_range or [base_ratio, base_ratio]
    was = f"{base_ratio:.3f}x ({b_lo:.3f}–{b_hi:.3f})"
    if c_ratio is None:
        return Check(name, metric, was, "case missing", "", not gated)
    c_lo, c_hi = c_range or [c_ratio, c_ratio]
    now = f"{c_ratio:.3f}x ({c_lo:.3f}–{c_hi:.3f})"
    if not gated:
        return Check(name, metric, was, now, NOT_GATED, True)
    limit = b_hi * (1 + tolerance)
    return Check(name, metric, was, now, f"low end <= {limit:.3f}x", c_lo <= limit)


def _decode_check(name: str, base: GateVariant, cur: GateVariant, tolerance: float, gated: bool) -> Check:
    """Higher is better: fails when even this run's best round is below the baseline's worst by more than tolerance."""
    metric = "decode tokens/s vs PyTorch"
    b_lo, b_hi = base["decode_speedup_range"]
    was = f"{base['decode_speedup']:.2f}x ({b_lo:.2f}–{b_hi:.2f})"
    if "decode_speedup" not in cur:
        return Check(name, metric, was, "not timed", "", not gated)
    c_lo, c_hi = cur["decode_speedup_range"]
    now = f"{cur['decode_speedup']:.2f}x ({c_lo:.2f}–{c_hi:.2f})"
    if not gated:
        return Check(name, metric, was, now, NOT_GATED, True)
    floor = b_lo * (1 - tolerance)
    return Check(name, metric, was, now, f"high end >= {floor:.2f}x", c_hi >= floor)


def _gated(check: Check) -> bool:
    return check.limit != NOT_GATED


def table(checks: list[Check]) -> str:
    lines = [
        "| variant | metric | baseline | this run | limit | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(lines + [c.row() for c in checks])


def load_baseline(path: Path) -> GateBaseline:
    if not path.is_file():
        raise ToolchainError(f"{path}: no baseline; create it on purpose with `make bench-baseline`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ToolchainError(f"{path}: not valid JSON ({e}); recreate it with `make bench-baseline`") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or "machines" not in data:
        raise ToolchainError(
            f"{path}: not a baseline of format {FORMAT_VERSION}; recreate it with `make bench-baseline`"
        )
    try:
        baseline = gate_baseline().validate_python(data)
    except ValidationError as e:
        raise ToolchainError(
            f"{path}: not a baseline of this version ({problems(e)}); recreate it with `make bench-baseline`"
        ) from None
    if not baseline["machines"]:
        raise ToolchainError(f"{path}: a baseline measured on no machine; recreate it with `make bench-baseline`")
    return baseline


def run_gate(
    run_dir: Path,
    baseline_path: Path,
    accuracy_tolerance: float | None = None,
    latency_tolerance: float | None = None,
) -> str:
    """Compare a run with the baseline; returns the markdown, raises GateError (with it) on a regression."""
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise ToolchainError(f"{report_path}: no report; run the recipe first")
    baseline = load_baseline(baseline_path)
    tolerances = baseline["tolerances"]
    acc_tol = (
        accuracy_tolerance if accuracy_tolerance is not None else tolerances.get("accuracy", DEFAULT_ACCURACY_TOLERANCE)
    )
    lat_tol = (
        latency_tolerance if latency_tolerance is not None else tolerances.get("latency", DEFAULT_LATENCY_TOLERANCE)
    )
    current = summarize(json.loads(report_path.read_text()), report_path)
    kinds = (baseline["kind"], current.get("kind", "classifier"))
    if kinds[0] != kinds[1]:
        raise ToolchainError(
            f"{baseline_path}: a baseline of a {kinds[0]} recipe, but {report_path} is a {kinds[1]} report; "
            f"gate against the baseline of the same recipe, or create one with "
            f"`python -m toolchain baseline {run_dir} --out bench/baselines/{run_dir.name}.json`"
        )
    mine = machine_class(current["environment"])
    same_cpu = mine in baseline["machines"]
    if same_cpu:
        against = mine
        checks = compare(current, baseline["machines"][mine], acc_tol, lat_tol)
    else:  # the class whose summary this run is closest to, with the cross-CPU tolerances
        acc_tol = max(acc_tol, CROSS_CPU_ACCURACY_TOLERANCE)
        lat_tol = max(lat_tol, CROSS_CPU_LATENCY_TOLERANCE)
        tried = {c: compare(current, b, acc_tol, lat_tol, same_cpu=False) for c, b in baseline["machines"].items()}
        # fewest failures; of those, the one that checks most (peer ratios recorded)
        against = min(tried, key=lambda c: (sum(not x.ok for x in tried[c]), -sum(_gated(x) for x in tried[c])))
        checks = tried[against]
    failed = [c for c in checks if not c.ok]
    commit = (baseline["machines"][against]["measured_at_commit"] or "?")[:12]
    where = (
        f"Baseline measured on this CPU class ({mine}) at commit `{commit}`"
        if same_cpu
        else f"No baseline for this CPU class ({mine}); gated against the closest of "
        f"{len(baseline['machines'])} classes, {against} (measured at `{commit}`), with the cross-CPU tolerances; "
        f"the ratios to PyTorch are shown, not gated (`make bench-baseline` here adds this class)"
    )
    text = "\n".join(
        [
            f"## Bench gate: {run_dir.name} against {baseline_path}",
            "",
            f"{where}; this run at `{(current['measured_at_commit'] or '?')[:12]}`. "
            f"Tolerances: accuracy {acc_tol * 100:.2f} pts, latency ratio {lat_tol * 100:.0f}% beyond both ranges.",
            "",
            table(checks),
            "",
            f"{len(checks) - len(failed)} of {len(checks)} checks pass"
            + (": " + "; ".join(f"{c.variant} {c.metric}" for c in failed) + " regressed" if failed else "."),
        ]
    )
    if failed:
        raise GateError(text)
    return text


def write_baseline(run_dir: Path, out: Path, accuracy_tolerance: float, latency_tolerance: float) -> GateBaseline:
    """Summarize a run into the baseline file (written atomically): its CPU class's entry is added or replaced, the
    other classes' entries of the same recipe are kept."""
    data = summarize(json.loads((run_dir / "report.json").read_text()), run_dir / "report.json")
    machines: dict[str, GateSummary] = {}
    if out.is_file():
        try:
            old = load_baseline(out)
            if (old["recipe"], old["kind"]) == (data["recipe"], data.get("kind", "classifier")):
                machines = old["machines"]
        except ToolchainError:
            pass  # an older format or a broken file: replaced by this run's
    machines[machine_class(data["environment"])] = data
    baseline: GateBaseline = {
        "format_version": FORMAT_VERSION,
        "recipe": data["recipe"],
        "kind": data.get("kind", "classifier"),
        "tolerances": {"accuracy": accuracy_tolerance, "latency": latency_tolerance},
        "machines": machines,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(baseline, indent=1) + "\n")
    os.replace(tmp, out)
    return baseline
