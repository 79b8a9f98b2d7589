"""Error-compensating 4-bit rounding (toolchain.llm.gptq): its packing is onnxruntime's MatMulNBits layout to the bit,
its rounding moves a projection's output less than rounding to nearest on correlated inputs, and on a tiny fused
decoder it writes every layer projection as a 4-bit MatMulNBits whose logits are closer to the float graph's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import one_matmul_graph, random_llama

from toolchain.compile.graph import matmul_nbits
from toolchain.errors import StageError
from toolchain.llm import fused, gptq
from toolchain.runtime import DecoderGenerator

_IDS = np.random.default_rng(0).integers(3, 512, (56, 30)).tolist()
PROMPTS, HELD_OUT = [[1, *p] for p in _IDS[:48]], [[1, *p] for p in _IDS[48:]]  # same distribution, different rows


def _correlated(rng: np.random.Generator, k: int) -> np.ndarray:
    """A map from white noise to inputs whose channels are correlated and differ in size, as hidden states do."""
    return (rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)) * rng.lognormal(0, 1, k)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_packing_is_onnxruntimes_layout(block: int, tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    k, n = 128, 24
    w = np.random.default_rng(block).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    matmul_nbits(tmp_path / "m.onnx", tmp_path / "q.onnx", block, True, 4)
    theirs = onnx.load(str(tmp_path / "q.onnx")).graph
    node = next(n for n in theirs.node if n.op_type == "MatMulNBits")
    arrays = {i.name: numpy_helper.to_array(i) for i in theirs.initializer}
    # with H = I no error moves to other channels: GPTQ rounds to nearest, as onnxruntime's quantizer does
    codes, scales = gptq.quantize(w, np.eye(k), block, actorder=False)
    np.testing.assert_array_equal(gptq.pack(codes, block), arrays[node.input[1]])
    np.testing.assert_array_equal(scales.T, arrays[node.input[2]].reshape(n, k // block))


def test_compensation_moves_the_output_less_than_rounding() -> None:
    rng = np.random.default_rng(0)
    k, n, block = 256, 64, 32
    mix = _correlated(rng, k)
    x = rng.standard_normal((2048, k)) @ mix
    w = rng.standard_normal((k, n))
    h = x.T @ x / len(x)
    codes, scales = gptq.quantize(w, h, block)
    assert codes.dtype == np.int8 and codes.min() >= -8 and codes.max() <= 7
    np.testing.assert_array_equal(scales, gptq.block_scales(w, block))  # static blocks: the scales of the weights
    per_weight = np.repeat(scales, block, axis=0)
    nearest = np.clip(np.rint(w / per_weight), -8, 7) * per_weight
    rounded = gptq.relative_error(w, nearest, h)
    compensated = gptq.relative_error(w, codes * per_weight, h)
    assert compensated < 0.7 * rounded
    held_out = rng.standard_normal((512, k)) @ mix  # and on inputs it never saw
    err = [np.square(held_out @ (q - w)).mean() for q in (nearest, codes * per_weight)]
    assert err[1] < err[0]


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gptq")
    fused.build(random_llama(hidden_size=128, intermediate_size=256), folder, max_positions=256)
    return folder / "model.onnx"


def _logits(path: Path, prompts: list[list[int]]) -> np.ndarray:
    gen = DecoderGenerator(path)
    return np.stack([gen.step(np.array([p]), gen.empty_past(), len(p))[0] for p in prompts])


def test_the_fused_graph_gets_4_bit_projections_closer_to_float(fp32_graph: Path, tmp_path: Path) -> None:
    skip = {"/model/layers.1/attn/o_proj/MatMul"}
    errors = gptq.apply(fp32_graph, tmp_path / "g.onnx", PROMPTS, 32, 4, skip)
    assert len(errors) == 2 * 4 - 1 and all(e["gptq"] < e["rtn"] for e in errors.values())
    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / "g.onnx")).graph.node}
    assert nodes["/model/layers.0/mlp/down_proj/MatMul_Q4"] == "MatMulNBits"
    assert nodes["/model/layers.1/attn/o_proj/MatMul"] == "MatMul"  # skipped
    assert nodes["/lm_head/MatMul"] == "MatMul"  # only the decoder layers: the head is the caller's
    # the same head and skipped node for both: rounded to nearest vs compensated
    matmul_nbits(fp32_graph, tmp_path / "rtn.onnx", 32, True, 4, exclude=[*skip, "/lm_head/MatMul"])
    reference = _logits(fp32_graph, HELD_OUT)
    rounded = np.abs(_logits(tmp_path / "rtn.onnx", HELD_OUT) - reference).mean()
    compensated = np.abs(_logits(tmp_path / "g.onnx", HELD_OUT) - reference).mean()
    assert compensated < 0.9 * rounded  # on prompts the calibration never saw


def test_a_block_size_that_does_not_divide_the_projections_is_named(fp32_graph: Path, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="128 input channels, not a multiple of block_size 256"):
        gptq.apply(fp32_graph, tmp_path / "o.onnx", PROMPTS, 256, 4, set())


@pytest.mark.parametrize("what", ["awq", "gptq"])
def test_the_stage_refuses_calibrated_rounding_on_a_graph_that_is_not_the_fused_one(what: str, tmp_path: Path) -> None:
    """A graph optimum exported (generation.graph: optimum, or a model type the fused graph does not cover): the
    stage names the field to remove before it reads a prompt."""
    from toolchain.stages.llm_quantize import LlmQuantizeConfig, calibration_prompts

    one_matmul_graph(tmp_path / "model.onnx", "/model/layers.0/mlp/down_proj/MatMul")
    spec = {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4, "calibration_rows": 8, what: True}
    c = LlmQuantizeConfig.model_validate(spec)
    with pytest.raises(StageError, match=f"{what} needs the toolchain's fused decoder graph.*remove {what}"):
        calibration_prompts(None, None, {}, tmp_path / "model.onnx", c)  # type: ignore[arg-type]
