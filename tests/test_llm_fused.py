"""The toolchain's fused decoder graph (toolchain.llm.fused) on a tiny random Llama: parity with PyTorch over decode
steps, the runtime's KvCache (one buffer per layer bound to past and present: written in place, never copied), the
prefix kept in the cache, buffers that grow, and the embedding read from the quantized LM head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import random_llama

from toolchain.compile.graph import matmul_nbits
from toolchain.llm import fused
from toolchain.llm.export import decode_parity
from toolchain.runtime import DecoderGenerator


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    model = random_llama(rope_theta=10000.0)
    folder = tmp_path_factory.mktemp("fused")
    info = fused.build(model, folder / "fp32", max_positions=256)
    assert info["ops"]["GroupQueryAttention"] == 2 and info["ops"]["SkipSimplifiedLayerNormalization"] == 4
    assert info["ops"]["MatMul"] == 2 * 4 + 1 and info["tied_embeddings"]
    return model, folder


PROMPT = [1, 17, 250, 3, 99, 400, 12]
PREFIX = [1, 17, 250, 3, 99]


def _torch_greedy(model: object, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_the_fused_graph_matches_pytorch_over_the_prompt_and_decode_steps(tiny) -> None:
    model, folder = tiny
    parity = decode_parity(model, folder / "fp32" / "model.onnx", PROMPT, steps=6)
    assert parity["max_abs_diff"] < 1e-4 and parity["greedy_agree"]


def test_the_kv_cache_is_written_in_place_and_generation_equals_transformers(tiny) -> None:
    model, folder = tiny
    gen = DecoderGenerator(folder / "fp32" / "model.onnx")
    assert gen.fused and not gen.can_pad and gen.kv is not None
    assert gen.generate_ids(PROMPT, max_new_tokens=12)[0] == _torch_greedy(model, PROMPT, 12)
    buffers = dict(gen.kv._buffers)
    for b in buffers.values():
        b[...] = 0  # in place: what the next runs write shows
    before = {n: b.copy() for n, b in buffers.items()}
    tokens = gen.stream_ids(PROMPT, max_new_tokens=3)
    next(tokens)  # the prompt's run: positions 0..6 written
    next(tokens)  # one decode step: position 7 written, into the same arrays
    assert all(gen.kv._buffers[n] is buffers[n] for n in buffers)  # no new cache arrays: bound once, reused
    changed = [not np.array_equal(before[n][:, :, 7], buffers[n][:, :, 7]) for n in buffers]
    assert all(changed)  # the present outputs were written into the past buffers themselves
    assert all(np.array_equal(before[n][:, :, 8:], buffers[n][:, :, 8:]) for n in buffers)
    tokens.close()


def test_the_prefix_stays_in_the_cache_and_other_prompts_do_not_corrupt_it(tiny) -> None:
    model, folder = tiny
    gen = DecoderGenerator(folder / "fp32" / "model.onnx")
    prompts = [[*PREFIX, 400, 12], [*PREFIX, 7], [1, 18, 250, 5], [*PREFIX, 31, 32, 33, 34]]
    alone = [gen.generate_ids(p, max_new_tokens=8)[0] for p in prompts]
    assert alone == [_torch_greedy(model, p, 8) for p in prompts]
    gen.set_prefix(PREFIX)
    assert gen._cached == PREFIX
    runs = gen.kv.run_seconds
    # the prefix is not run again for a prompt that extends it; a prompt without it overwrites it, and the next
    # prompt with it puts it back
    assert [gen.generate_ids(p, max_new_tokens=8)[0] for p in prompts] == alone
    assert gen._cached == PREFIX and gen.kv.run_seconds > runs
    assert gen.generate_batch_ids(prompts, max_new_tokens=8) == alone  # no padding: one prompt at a time
    assert gen.generate_batch_ids(prompts[:1], max_new_tokens=8) == alone[:1]  # a batch of one too


def test_buffers_grow_and_keep_what_they_hold(tiny) -> None:
    model, folder = tiny
    gen = DecoderGenerator(folder / "fp32" / "model.onnx")
    gen.kv.block = 8  # a prompt of 7 tokens and 20 new ones: the buffers grow twice, mid-generation
    gen.set_prefix(PREFIX)
    assert gen.generate_ids(PROMPT, max_new_tokens=20)[0] == _torch_greedy(model, PROMPT, 20)
    assert gen.kv.capacity == 32


def test_an_open_stream_refuses_a_second_generation_in_its_thread(tiny) -> None:
    _, folder = tiny
    gen = DecoderGenerator(folder / "fp32" / "model.onnx")
    tokens = gen.stream_ids(PROMPT, max_new_tokens=4)
    first = next(tokens)
    with pytest.raises(RuntimeError, match="still open in this thread"):
        gen.generate_ids(PROMPT, max_new_tokens=2)
    rest = list(tokens)
    assert [first, *rest] == gen.generate_ids(PROMPT, max_new_tokens=4)[0]


def test_the_embedding_is_read_from_the_quantized_lm_head(tiny, tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    _, folder = tiny
    src = folder / "fp32" / "model.onnx"
    matmul_nbits(src, tmp_path / "int4.onnx", block_size=32, accuracy_level=4)
    assert fused.share_embedding(tmp_path / "int4.onnx", tmp_path / "shared.onnx")
    model = onnx.load(str(tmp_path / "shared.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "Gather" not in ops and ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 2 * 4 + 1
    assert "model.embed_tokens.weight" not in {i.name for i in model.graph.initializer}  # the float table is gone
    # smaller by the float table (512 x 64 x 4 bytes), give or take the scales' (N, blocks, 1) view (4 KB)
    shrink = (tmp_path / "int4.onnx").stat().st_size - (tmp_path / "shared.onnx").stat().st_size
    assert abs(shrink - 512 * 64 * 4) < 8192
    # the rows it reads are the LM head's 4-bit weights dequantized: (q - 8) * scale, low nibble first
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed, scales = inits[head.input[1]], inits[head.input[2]]  # (N, blocks, 16) uint8, (N, blocks)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], packed.shape[1], 32).astype(np.float32)
    table = ((q - 8) * scales[:, :, None]).reshape(packed.shape[0], -1)
    model.graph.output.append(helper.make_tensor_value_info("embeddings", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "probe.onnx"))
    gen = DecoderGenerator(tmp_path / "probe.onnx")
    feeds = {"input_ids": np.array([PROMPT]), "seqlens_k": np.array([6], np.int32)}
    feeds |= {"total_sequence_length": np.array(7, np.int32), **gen.empty_past()}
    rows = dict(zip([o.name for o in gen.session.get_outputs()], gen.session.run(None, feeds), strict=True))
    np.testing.assert_allclose(rows["embeddings"][0], table[PROMPT], rtol=1e-6, atol=1e-6)
    # and the graph generates: the int4 decoder's greedy tokens come from the same loop
    assert len(DecoderGenerator(tmp_path / "shared.onnx").generate_ids(PROMPT, max_new_tokens=5)[0]) == 5


def test_models_outside_the_fused_layout_are_named() -> None:
    from types import SimpleNamespace

    assert fused.supports(SimpleNamespace(model_type="gpt2")) == (
        "model type 'gpt2' (the fused graph covers llama, mistral, qwen2)"
    )
    assert fused.supports(SimpleNamespace(model_type="llama", hidden_act="gelu")) == "hidden_act 'gelu' (SiLU only)"
    assert fused.supports(SimpleNamespace(model_type="llama", hidden_act="silu", attention_bias=True)) == (
        "attention_bias"
    )
    assert fused.supports(SimpleNamespace(model_type="llama", hidden_act="silu")) is None
