"""What the optimize stage and the CPU session leave of the residual Add + LayerNormalization, and the GELU
approximation of dynamic-int8 (onnxruntime's CPU SkipLayerNormalization kernel is slower than the two ops)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.compile.graph import approximate_gelu
from toolchain.errors import StageError
from toolchain.runtime import session_options


def _residual_layernorm(path: Path) -> Path:
    h = 16
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, h])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4, h])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, h])
    inits = [
        numpy_helper.from_array(np.ones(h, np.float32), "g"),
        numpy_helper.from_array(np.zeros(h, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "s"], ["a"]),
        helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-12),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x, s], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save(model, str(path))
    return path


def _ops_after_session(model: Path, opts: ort.SessionOptions, out: Path) -> list[str]:
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(out)).graph.node]


def test_cpu_sessions_keep_add_and_layernorm_apart(tmp_path: Path) -> None:
    model = _residual_layernorm(tmp_path / "m.onnx")
    assert _ops_after_session(model, session_options(1), tmp_path / "ours.onnx") == ["Add", "LayerNormalization"]
    cpu_twice = session_options(1, providers=["CPUExecutionProvider", "CPUExecutionProvider"])  # as the bench asks
    assert _ops_after_session(model, cpu_twice, tmp_path / "cpu.onnx") == ["Add", "LayerNormalization"]
    # onnxruntime's default fuses them (the check can fail), and a GPU provider's session keeps its fusion
    assert "SkipLayerNormalization" in _ops_after_session(model, ort.SessionOptions(), tmp_path / "default.onnx")
    gpu = session_options(1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "SkipLayerNormalization" in _ops_after_session(model, gpu, tmp_path / "gpu.onnx")


def test_gelu_approximation_rewrites_the_fused_gelu_nodes(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    bias = numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "bias")
    node = helper.make_node("BiasGelu", ["x", "bias"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [x], [y], [bias])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(tmp_path / "gelu.onnx"))
    out, count = approximate_gelu(tmp_path / "gelu.onnx", tmp_path / "tanh.onnx")
    assert count == 1 and [n.op_type for n in onnx.load(str(out)).graph.node] == ["FastGelu"]
    feed = {"x": np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32) * 3}
    exact = ort.InferenceSession(str(tmp_path / "gelu.onnx")).run(None, feed)[0]
    approx = ort.InferenceSession(str(out)).run(None, feed)[0]
    assert 0 < np.abs(exact - approx).max() < 1e-2  # an approximation, a close one
    with pytest.raises(StageError, match="no fused Gelu or BiasGelu node"):
        approximate_gelu(_residual_layernorm(tmp_path / "m.onnx"), tmp_path / "x.onnx")
