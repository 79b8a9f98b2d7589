"""Quantization modes on the tiny model: static int8 (calibrated QDQ), int4 weight-only (MatMulNBits), fp16, dynamic
int8 per tensor, and the sensitivity ranking with `exclude: auto`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from conftest import tiny_recipe_dict, write_recipe

from toolchain import engine
from toolchain.compile.graph import matmul_input_sources
from toolchain.recipe.load import load_recipe


def test_static_int8_and_int4_variants(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_recipe_dict(tiny_model, name="modes")
    data["data"].update(max_train_rows=600, max_eval_rows=100)
    data["compile"]["quantize"] = [
        {"mode": "static-int8", "calibration_rows": 40, "calibration_length": 48, "calibration_method": "percentile"},
        {"mode": "int4", "block_size": 32},
    ]
    data["bench"].update(batch_sizes=[1], seq_lens=[16])
    data["budget"].update(latency_case="b1_s16", max_accuracy_drop=0.5)
    ctx = engine.run(load_recipe(write_recipe(tmp_path, data)), tmp_path / "runs")

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


def test_fp16_per_tensor_and_sensitivity_variants(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_recipe_dict(tiny_model, name="modes2")
    data["data"].update(max_train_rows=600, max_eval_rows=100)
    data["compile"]["quantize"] = [
        "fp16",
        {"mode": "dynamic-int8", "per_channel": False, "sensitivity": True, "sensitivity_rows": 16},
        {
            "mode": "static-int8",
            "calibration_rows": 32,
            "calibration_length": 48,
            "exclude": "auto",
            "sensitivity_rows": 16,
            "auto_rows": 64,
            "auto_target_drop": 0.0,
        },
    ]
    data["bench"].update(batch_sizes=[1], seq_lens=[16])
    data["budget"].update(latency_case="b1_s16", max_accuracy_drop=0.5)
    ctx = engine.run(load_recipe(write_recipe(tmp_path, data)), tmp_path / "runs")

    fp16 = ctx.artifacts["quantize.onnx-fp16"]
    model = onnx.load(str(fp16.file("model.onnx")))
    assert fp16.meta["fp16_initializers"] > 0.5 * fp16.meta["initializers"]
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.INT64] * 3  # same interface
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    per_tensor = ctx.artifacts["quantize.onnx-int8-dynamic-per-tensor"]
    ranking = json.loads(per_tensor.file("sensitivity.json").read_text())
    assert len(ranking) == per_tensor.meta["sensitivity"]["nodes"] >= 4  # attention, MatMuls, embeddings...
    mse = [r["logit_mse"] for r in ranking]
    assert mse == sorted(mse, reverse=True) and mse[0] > 0
    assert per_tensor.meta["excluded"] == []  # ranking only: everything quantized

    auto = ctx.artifacts["quantize.onnx-int8-static-minmax-auto"]
    meta = auto.meta
    tries = meta["auto"]["tries"]
    assert tries[0]["excluded"] == 0
    chosen = len(meta["excluded"])
    assert any(t["excluded"] == chosen and t["flip_rate"] == 0 for t in tries) or chosen == meta["sensitivity"]["nodes"]
    worst = [r["node"] for r in json.loads(auto.file("sensitivity.json").read_text())]
    assert meta["excluded"] == worst[:chosen]  # the most sensitive first
    graph = onnx.load(str(auto.file("model.onnx"))).graph
    sources = matmul_input_sources(graph)
    for name in meta["excluded"]:
        assert "DequantizeLinear" not in sources[name], name  # kept in float

    report = json.loads((tmp_path / "runs" / "modes2" / "report.json").read_text())
    by = {v["name"]: v for v in report["variants"]}
    assert by["onnx-fp16"]["precision"] == "fp16" and 0 < by["onnx-fp16"]["accuracy"] <= 1
    assert by["onnx-int8-static-minmax-auto"]["compression"]["excluded"] == meta["excluded"]
    md = (tmp_path / "runs" / "modes2" / "report.md").read_text()
    assert "## Sensitivity: onnx-int8-dynamic-per-tensor" in md and "exclude: auto" in md
    assert "Pareto front" in md


def test_excluding_a_node_the_graph_lacks_is_an_error(tiny_model: Path, tmp_path: Path) -> None:
    import pytest

    from toolchain.errors import StageError

    data = tiny_recipe_dict(tiny_model, name="bogus")
    data["data"].update(max_train_rows=200, max_eval_rows=40)
    data["compile"]["quantize"] = [{"mode": "int4", "exclude": ["/no/such/MatMul"]}]
    with pytest.raises(StageError, match=r"no quantizable node called: \['/no/such/MatMul'\]"):
        engine.run(load_recipe(write_recipe(tmp_path, data)), tmp_path / "runs")
