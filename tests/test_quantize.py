"""Quantization modes on the tiny model: static int8 (calibrated QDQ) and int4 weight-only (MatMulNBits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from conftest import tiny_recipe_dict, write_recipe

from toolchain import pipeline
from toolchain.recipe import load_recipe


def test_static_int8_and_int4_variants(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_recipe_dict(tiny_model, name="modes")
    data["data"].update(max_train_rows=600, max_eval_rows=100)
    data["compile"]["quantize"] = [
        {"mode": "static-int8", "calibration_rows": 40, "calibration_length": 48, "calibration_method": "percentile"},
        {"mode": "int4", "block_size": 32},
    ]
    data["bench"].update(batch_sizes=[1], seq_lens=[16])
    data["budget"].update(latency_case="b1_s16", max_accuracy_drop=0.5)
    ctx = pipeline.run(load_recipe(write_recipe(tmp_path, data)), tmp_path / "runs")

    static = ctx.artifacts["quantize.onnx-int8-static-percentile"]
    assert static.meta["calibration_rows"] == 40
    ops = [n.op_type for n in onnx.load(str(static.file("model.onnx"))).graph.node]
    assert ops.count("QuantizeLinear") >= 6 and ops.count("DequantizeLinear") >= 12  # inputs and weights of MatMuls

    int4 = ctx.artifacts["quantize.onnx-int4-b32"]
    graph = onnx.load(str(int4.file("model.onnx"))).graph
    assert int4.meta["matmul_nbits"] == sum(n.op_type == "MatMulNBits" for n in graph.node) >= 6
    assert "MatMul" not in [n.op_type for n in graph.node]  # every MatMul with a constant weight became 4-bit

    report = json.loads((tmp_path / "runs" / "modes" / "report.json").read_text())
    by = {v["name"]: v for v in report["variants"]}
    assert by["onnx-int4-b32"]["precision"] == "int4" and by["onnx-int8-static-percentile"]["precision"] == "int8"
    base = np.array(json.loads(ctx.artifacts["evaluate.pytorch-fp32"].file("metrics.json").read_text())["predictions"])
    for name in ("onnx-int8-static-percentile", "onnx-int4-b32"):
        pred = np.array(json.loads(ctx.artifacts[f"evaluate.{name}"].file("metrics.json").read_text())["predictions"])
        assert (pred == base).mean() >= 0.8, name  # compressed, not broken
