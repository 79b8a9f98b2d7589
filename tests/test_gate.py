"""The CI gate's decision rule on synthetic numbers, and the gate/baseline commands on a real report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from toolchain.gate import GateError, compare, machine_class, run_gate, summarize, table, write_baseline


def summary(ratios: dict[str, tuple[float, float, float]], accuracy: dict[str, float] | None = None) -> dict:
    """ratios: variant -> (ratio, low, high) on b1_s128; PyTorch is implied."""
    accuracy = accuracy or {}
    variants = {
        "pytorch-fp32": {"accuracy": accuracy.get("pytorch-fp32", 0.9), "ratio_to_pytorch": {}, "ratio_range": {}}
    }
    for name, (r, lo, hi) in ratios.items():
        variants[name] = {
            "accuracy": accuracy.get(name, 0.9),
            "ratio_to_pytorch": {"b1_s128": r},
            "ratio_range": {"b1_s128": [lo, hi]},
        }
    return {"variants": variants}


BASE = summary({"onnx-int8": (0.40, 0.38, 0.42), "onnx-fp32": (0.80, 0.78, 0.83)})


def failing(checks) -> list[tuple[str, str]]:
    return [(c.variant, c.metric) for c in checks if not c.ok]


def test_the_same_numbers_pass() -> None:
    checks = compare(BASE, BASE)
    assert failing(checks) == [] and len(checks) == 5  # 3 accuracies + 2 latency ratios


def test_noise_within_the_ranges_passes_and_a_slower_machine_does_not_matter() -> None:
    # every variant 2x slower in ms on another machine: ratios unchanged
    noisy = summary({"onnx-int8": (0.44, 0.41, 0.47), "onnx-fp32": (0.79, 0.75, 0.84)})
    assert failing(compare(noisy, BASE)) == []


def test_a_latency_regression_beyond_noise_names_the_variant_and_metric() -> None:
    slower = summary({"onnx-int8": (0.60, 0.57, 0.63), "onnx-fp32": (0.80, 0.78, 0.83)})
    checks = compare(slower, BASE, latency_tolerance=0.10)
    assert failing(checks) == [("onnx-int8", "b1_s128 p50 vs PyTorch")]
    assert "onnx-int8 | b1_s128 p50 vs PyTorch" in table(checks) and "**REGRESSION**" in table(checks)
    # just inside: the low end 0.46 <= 0.42 * 1.1 = 0.462
    assert failing(compare(summary({"onnx-int8": (0.48, 0.46, 0.50), "onnx-fp32": (0.8, 0.78, 0.83)}), BASE)) == []


def test_accuracy_drop_beyond_tolerance_fails_and_within_passes() -> None:
    worse = summary({"onnx-int8": (0.4, 0.38, 0.42), "onnx-fp32": (0.8, 0.78, 0.83)}, {"onnx-int8": 0.893})
    assert failing(compare(worse, BASE, accuracy_tolerance=0.005)) == [("onnx-int8", "accuracy %")]
    assert failing(compare(worse, BASE, accuracy_tolerance=0.01)) == []


def test_on_another_cpu_the_ratios_to_pytorch_are_shown_not_gated_but_the_ratios_to_the_peer_are() -> None:
    base = copy.deepcopy(BASE)
    base["variants"]["onnx-int8"]["vs_peer"] = {
        "peer": "optimum-int8",
        "ratio": {"b1_s128": 0.9},
        "range": {"b1_s128": [0.88, 0.92]},
    }
    # int8 kernels without VNNI: every int8 graph 1.4x slower against PyTorch, ours and the peer's alike
    other_cpu = summary({"onnx-int8": (0.56, 0.53, 0.59), "onnx-fp32": (0.80, 0.78, 0.83)})
    other_cpu["variants"]["onnx-int8"]["vs_peer"] = {
        "peer": "optimum-int8",
        "ratio": {"b1_s128": 0.91},
        "range": {"b1_s128": [0.89, 0.93]},
    }
    assert failing(compare(other_cpu, base)) == [("onnx-int8", "b1_s128 p50 vs PyTorch")]  # on the same CPU: fails
    checks = compare(other_cpu, base, same_cpu=False)
    assert failing(checks) == []
    assert "| onnx-int8 | b1_s128 p50 vs PyTorch | 0.400x (0.380–0.420) | 0.560x (0.530–0.590) | not gated" in table(
        checks
    )
    # ours slower than the peer by more than the noise: fails on any CPU
    other_cpu["variants"]["onnx-int8"]["vs_peer"]["range"]["b1_s128"] = [1.05, 1.10]
    assert failing(compare(other_cpu, base, same_cpu=False)) == [("onnx-int8", "b1_s128 p50 vs optimum-int8")]
    del other_cpu["variants"]["onnx-int8"]["vs_peer"]
    assert failing(compare(other_cpu, base, same_cpu=False)) == [("onnx-int8", "b1_s128 p50 vs optimum-int8")]


def test_machine_class_is_the_model_and_the_isa_flags() -> None:
    assert machine_class({"cpu_model": "AMD EPYC", "cpu_flags": ["avx2"]}) == "AMD EPYC [avx2]"
    assert machine_class({"cpu_model": "X", "cpu_flags": ["avx2", "avx512_vnni"]}) == "X [avx2 avx512_vnni]"
    assert machine_class({"cpu_model": "X", "cpu_flags": []}) == "X [no AVX2]"
    assert machine_class({"cpu_model": "X"}) == "X [flags not recorded]"


def test_a_missing_variant_fails_and_a_new_one_is_ignored() -> None:
    cur = copy.deepcopy(BASE)
    del cur["variants"]["onnx-fp32"]
    cur["variants"]["onnx-new"] = cur["variants"]["onnx-int8"]
    assert failing(compare(cur, BASE)) == [("onnx-fp32", "present")]


def fake_report(ratio: float, accuracy: float = 0.9, cpu: str = "cpu", peer_ratio: float | None = None) -> dict:
    """PyTorch at 20 ms, onnx-int8 at `ratio` of it; with `peer_ratio`, an Optimum int8 peer at that ratio."""

    def variant(name: str, p50: float, rounds: list[float], acc: float, peer: bool = False) -> dict:
        """A whole row, as toolchain.report.rows.ClassifierRow has it (the gate checks rows read back)."""
        stats = {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "cv": 0.01, "n": 50, "p50_ci95": [p50, p50]}
        return {
            "name": name,
            "format": "pytorch" if name.startswith("pytorch") else "onnx",
            "precision": "fp32" if name.startswith("pytorch") else "int8",
            "accuracy": acc,
            "correct": int(acc * 100),
            "eval_rows": 100,
            "accuracy_drop": 0.9 - acc,
            "size_bytes": 23_000_000,
            "peak_rss_bytes": None,
            "cold_start_seconds": None,
            "latency_ms": {"b1_s128": stats | {"items_per_second": 1e3 / p50}},
            "latency_samples_ms": {"b1_s128": [p50]},
            "round_p50": {"b1_s128": rounds},
            "parity": None,
            "compression": {},
            "artifact": "0" * 64,
            "peer": peer,
            "latency_ratio_to_pytorch": {"b1_s128": p50 / 20.0},
            "latency_ratio_ci": {"b1_s128": [min(rounds) / 20.0, max(rounds) / 20.0]},
        }

    spread = (0.98, 1.0, 1.02, 0.99, 1.01)
    rows = [
        variant("pytorch-fp32", 20.0, [20.0] * 5, 0.9),
        variant("onnx-int8", 20.0 * ratio, [20.0 * ratio * f for f in spread], accuracy),
    ]
    if peer_ratio is not None:
        rows.append(variant("optimum-int8", 20.0 * peer_ratio, [20.0 * peer_ratio * f for f in spread], 0.9, True))
    return {
        "recipe": "ci",
        "measured_at_commit": "abc",
        "environment": {"cpu_model": cpu, "cpu_flags": ["avx2"], "cores_physical": 2, "threads": 1, "versions": {}},
        "data": {"eval_rows": 100},
        "latency_case": "b1_s128",
        "shipped": "onnx-int8",
        "variants": rows,
    }


def test_gate_and_baseline_commands(tmp_path: Path, capsys) -> None:
    from toolchain.cli import main

    run = tmp_path / "runs" / "ci"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(fake_report(0.4)))
    baseline = tmp_path / "baselines" / "ci.json"
    data = write_baseline(run, baseline, 0.005, 0.1)
    mine = data["machines"]["cpu [avx2]"]["variants"]["onnx-int8"]
    assert mine["ratio_range"]["b1_s128"] == [pytest.approx(0.392), pytest.approx(0.408)]
    assert json.loads(baseline.read_text()) == json.loads(json.dumps(data))
    assert "checks pass." in run_gate(run, baseline)

    (run / "report.json").write_text(json.dumps(fake_report(0.6)))  # a slower variant swapped in
    with pytest.raises(GateError, match="onnx-int8 b1_s128 p50 vs PyTorch regressed"):
        run_gate(run, baseline)
    assert main(["gate", str(run), "--baseline", str(baseline)]) == 4
    out = capsys.readouterr().out
    assert "**REGRESSION**" in out and "| onnx-int8 |" in out
    assert main(["gate", str(run), "--baseline", str(tmp_path / "nope.json")]) == 1
    assert "make bench-baseline" in capsys.readouterr().err


def test_a_baseline_keeps_one_entry_per_cpu_class_and_an_unknown_cpu_is_gated_against_its_peer(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "ci"
    run.mkdir(parents=True)
    baseline = tmp_path / "ci.json"
    (run / "report.json").write_text(json.dumps(fake_report(0.13, cpu="Xeon", peer_ratio=0.15)))
    write_baseline(run, baseline, 0.005, 0.1)
    (run / "report.json").write_text(json.dumps(fake_report(0.18, cpu="EPYC", peer_ratio=0.205)))
    data = write_baseline(run, baseline, 0.005, 0.1)
    assert list(data["machines"]) == ["Xeon [avx2]", "EPYC [avx2]"]  # the first class kept, the second added
    peer = data["machines"]["Xeon [avx2]"]["variants"]["onnx-int8"]["vs_peer"]
    assert peer["peer"] == "optimum-int8" and peer["ratio"]["b1_s128"] == pytest.approx(0.13 / 0.15)
    assert "vs_peer" not in data["machines"]["Xeon [avx2]"]["variants"]["optimum-int8"]  # a peer has no peer
    assert "this CPU class (EPYC [avx2])" in run_gate(run, baseline)  # each class against its own
    # a third CPU: int8 slower against PyTorch than on either, as fast as ever against the peer: passes
    (run / "report.json").write_text(json.dumps(fake_report(0.25, cpu="Other", peer_ratio=0.29)))
    text = run_gate(run, baseline)
    assert "No baseline for this CPU class (Other [avx2])" in text and "not gated" in text
    # ... and slower against the peer: fails on the peer check only
    (run / "report.json").write_text(json.dumps(fake_report(0.25, cpu="Other", peer_ratio=0.20)))
    with pytest.raises(GateError, match=r"checks pass: onnx-int8 b1_s128 p50 vs optimum-int8 regressed$"):
        run_gate(run, baseline)
    # int8 rounding differs by ISA: on a new CPU accuracy may move by up to 1 point, against the closest class
    (run / "report.json").write_text(json.dumps(fake_report(0.25, accuracy=0.892, cpu="Other", peer_ratio=0.29)))
    assert "accuracy 1.00 pts, latency ratio 25%" in run_gate(run, baseline)
    (run / "report.json").write_text(json.dumps(fake_report(0.25, accuracy=0.888, cpu="Other", peer_ratio=0.29)))
    with pytest.raises(GateError, match=r"checks pass: onnx-int8 accuracy % regressed$"):
        run_gate(run, baseline)
    (run / "report.json").write_text(json.dumps(fake_report(0.18, accuracy=0.888, cpu="EPYC", peer_ratio=0.205)))
    with pytest.raises(GateError, match=r"accuracy 0.50 pts"):  # on a known CPU, its own tolerance
        run_gate(run, baseline)
    # a baseline of the old format is named with the fix; `baseline` replaces it
    baseline.write_text(json.dumps({"format_version": 1, "recipe": "ci", "variants": {}}))
    from toolchain.errors import ToolchainError

    with pytest.raises(
        ToolchainError,
        match=r"ci\.json: not a baseline of format 2; recreate it with `make bench-baseline`",
    ):
        run_gate(run, baseline)
    assert list(write_baseline(run, baseline, 0.005, 0.1)["machines"]) == ["EPYC [avx2]"]


def test_a_report_whose_rows_are_not_this_versions_is_named_with_the_fix(tmp_path: Path) -> None:
    from toolchain.errors import ToolchainError

    run = tmp_path / "runs" / "ci"
    run.mkdir(parents=True)
    report = fake_report(0.4)
    del report["variants"][1]["latency_ratio_ci"]
    (run / "report.json").write_text(json.dumps(report))
    with pytest.raises(ToolchainError, match=r"report\.json: its variants are not report rows.*run the recipe again"):
        write_baseline(run, tmp_path / "b.json", 0.005, 0.1)
    baseline = tmp_path / "bad.json"
    baseline.write_text(json.dumps({"format_version": 2, "machines": {"x": {"variants": {"x": {"correct": 1}}}}}))
    with pytest.raises(ToolchainError, match=r"bad\.json: not a baseline of this version"):
        run_gate(run, baseline)


def test_summary_keeps_what_the_gate_reads() -> None:
    s = summarize(fake_report(0.4))
    assert set(s["variants"]) == {"pytorch-fp32", "onnx-int8"}
    assert s["variants"]["onnx-int8"]["ratio_to_pytorch"]["b1_s128"] == pytest.approx(0.4)


def generation_report(speedups: list[float], accuracy: float = 0.86) -> dict:
    """A generation report as report/generation.py writes it: decode tokens/s per round, PyTorch at 20 tokens/s."""

    def row(name: str, rounds: list[float] | None, acc: float) -> dict:
        """A whole row, as toolchain.report.rows.GeneratorRow has it."""
        r = {
            "name": name,
            "format": "pytorch" if name.startswith("pytorch") else "onnx",
            "precision": "fp32" if name.startswith("pytorch") else "int4",
            "accuracy": acc,
            "correct": round(acc * 872),
            "eval_rows": 872,
            "accuracy_drop": 0.878 - acc,
            "size_bytes": 100_000_000,
            "unparsed": 0,
            "max_new_tokens": 4,
            "eval_batch_size": 8,
            "prefix_tokens": 0,
        }
        if rounds is not None:
            r |= {"decode_tokens_per_second": sorted(rounds)[1], "decode_tokens_per_second_rounds": rounds}
            r["decode_speedup"] = sorted(rounds)[1] / 20.0
        return r

    return {
        "kind": "generation",
        "recipe": "gen",
        "measured_at_commit": "abc",
        "environment": {"cpu_model": "cpu", "threads": 2},
        "data": {"eval_rows": 872},
        "variants": [
            row("pytorch-untuned", None, 0.59),
            row("pytorch-fp32", [20.0, 20.0, 20.0], 0.878),
            row("onnx-int4", [20.0 * s for s in speedups], accuracy),
        ],
    }


def test_a_generation_report_is_gated_on_decode_speed_and_accuracy(tmp_path: Path, capsys) -> None:
    from toolchain.cli import main

    run = tmp_path / "runs" / "gen"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(generation_report([2.2, 2.3, 2.4])))
    baseline = tmp_path / "gen.json"
    data = write_baseline(run, baseline, 0.005, 0.1)
    assert data["kind"] == "generation"
    mine = data["machines"]["cpu [flags not recorded]"]["variants"]["onnx-int4"]
    assert mine["decode_speedup_range"] == [pytest.approx(2.2), pytest.approx(2.4)]
    assert "checks pass." in run_gate(run, baseline)
    # noise: this run's best round still within 10% of the baseline's worst
    (run / "report.json").write_text(json.dumps(generation_report([1.9, 2.0, 2.05])))
    assert "checks pass." in run_gate(run, baseline)
    (run / "report.json").write_text(json.dumps(generation_report([1.5, 1.6, 1.7])))
    with pytest.raises(GateError, match="onnx-int4 decode tokens/s vs PyTorch regressed"):
        run_gate(run, baseline)
    (run / "report.json").write_text(json.dumps(generation_report([2.2, 2.3, 2.4], accuracy=0.84)))
    with pytest.raises(GateError, match="onnx-int4 accuracy % regressed"):
        run_gate(run, baseline)
    # a classifier report against a generation baseline: a clear error, not a KeyError
    (run / "report.json").write_text(json.dumps(fake_report(0.4)))
    assert main(["gate", str(run), "--baseline", str(baseline)]) == 1
    assert "a baseline of a generation recipe" in capsys.readouterr().err


def test_on_a_new_cpu_a_class_with_peer_ratios_is_preferred_to_one_without(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "ci"
    run.mkdir(parents=True)
    baseline = tmp_path / "ci.json"
    (run / "report.json").write_text(json.dumps(fake_report(0.13, cpu="Old")))  # no peer row: no peer ratios
    write_baseline(run, baseline, 0.005, 0.1)
    (run / "report.json").write_text(json.dumps(fake_report(0.18, cpu="EPYC", peer_ratio=0.205)))
    write_baseline(run, baseline, 0.005, 0.1)
    (run / "report.json").write_text(json.dumps(fake_report(0.25, cpu="New", peer_ratio=0.29)))
    assert "gated against the closest of 2 classes, EPYC [avx2]" in run_gate(run, baseline)
