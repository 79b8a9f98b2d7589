"""Activation-aware weight scaling of the fused decoder graph (toolchain.llm.awq) on a tiny random Llama whose hidden
state has outlier channels, as trained LMs do: the scaled graph computes the same function in float, and its 4-bit
weights are closer to the float model than round-to-nearest's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_matmul_graph, random_llama

from toolchain.compile.graph import matmul_nbits
from toolchain.errors import StageError
from toolchain.llm import awq, fused
from toolchain.runtime import DecoderGenerator

PROMPTS = [[1, *range(10 + 7 * k, 40 + 7 * k)] for k in range(12)]
HELD_OUT = [[1, *range(300 + 5 * k, 330 + 5 * k)] for k in range(4)]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = random_llama(hidden_size=128, intermediate_size=256)
    with torch.no_grad():  # outlier channels in every norm's output, as in trained LMs
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 70, 101]] = 25.0
    folder = tmp_path_factory.mktemp("awq")
    fused.build(model, folder / "fp32", max_positions=256)
    return folder


def _logits(path: Path, prompts: list[list[int]]) -> np.ndarray:
    gen = DecoderGenerator(path)
    return np.stack([gen.step(np.array([p]), gen.empty_past(), len(p))[0] for p in prompts])


def test_fake_quant_rounds_as_onnxruntimes_quantizer() -> None:
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n, block = 128, 8, 32
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    packed = np.zeros((n, k // block, block // 2), np.uint8)
    scales = np.zeros(n * k // block, np.float32)
    zero_points = np.zeros(n * ((k // block + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block, n, k, True)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k // block, block).astype(np.float32) - 8
    dequantized = (codes * scales.reshape(n, k // block, 1)).reshape(n, k).T
    np.testing.assert_allclose(awq.fake_quant(w, block), dequantized, rtol=0, atol=1e-6)


def test_scaling_keeps_the_function_and_4_bits_lose_less(graphs: Path, tmp_path: Path) -> None:
    src = graphs / "fp32" / "model.onnx"
    report = awq.apply(src, tmp_path / "awq.onnx", PROMPTS, block_size=32, clip=False)
    assert any(a > 0 for a in report["alpha"].values())  # the outlier channels were scaled
    assert all(report["error_awq"][n] <= report["error_rtn"][n] for n in report["alpha"])
    reference = _logits(src, HELD_OUT)
    np.testing.assert_allclose(_logits(tmp_path / "awq.onnx", HELD_OUT), reference, atol=1e-3)  # same function
    for name, path in (("rtn", src), ("awq", tmp_path / "awq.onnx")):
        matmul_nbits(path, tmp_path / f"{name}-int4.onnx", 32, True, 4)
    rtn = np.abs(_logits(tmp_path / "rtn-int4.onnx", HELD_OUT) - reference).mean()
    scaled = np.abs(_logits(tmp_path / "awq-int4.onnx", HELD_OUT) - reference).mean()
    assert scaled < 0.8 * rtn  # on prompts the calibration never saw


def test_clipping_lowers_the_quantized_error_further(graphs: Path, tmp_path: Path) -> None:
    src = graphs / "fp32" / "model.onnx"
    plain = awq.apply(src, tmp_path / "a.onnx", PROMPTS, block_size=32, clip=False)
    clipped = awq.apply(src, tmp_path / "b.onnx", PROMPTS, block_size=32, clip=True)
    assert all(clipped["error_awq"][n] <= plain["error_awq"][n] + 1e-9 for n in plain["alpha"])
    assert sum(clipped["error_awq"].values()) < sum(plain["error_awq"].values())


def test_a_graph_that_is_not_the_fused_one_is_refused(tmp_path: Path) -> None:
    one_matmul_graph(tmp_path / "m.onnx", "/lm_head/MatMul")
    with pytest.raises(StageError, match="not the toolchain's fused decoder graph"):
        awq.apply(tmp_path / "m.onnx", tmp_path / "o.onnx", PROMPTS, block_size=32)


def test_a_block_size_that_does_not_divide_the_projections_is_named(graphs: Path, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="128 input channels, not a multiple of block_size 256"):
        awq.apply(graphs / "fp32" / "model.onnx", tmp_path / "o.onnx", PROMPTS, block_size=256)
