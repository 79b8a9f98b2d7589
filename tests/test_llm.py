"""Decoder LMs on a tiny random Llama: export with the KV cache, parity over decode steps, int4 weights, and the
light runtime's greedy generation against transformers' own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_llama

from toolchain.compile.graph import matmul_nbits
from toolchain.llm.export import decode_parity, export_with_past
from toolchain.runtime import DecoderGenerator


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    model = random_llama()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder / "hf")
    export_with_past(folder / "hf", folder / "onnx")
    return model, folder


PROMPT = [1, 17, 250, 3, 99, 400, 12]


def test_export_has_the_kv_cache_and_matches_pytorch_over_decode_steps(tiny_llama) -> None:
    model, folder = tiny_llama
    gen = DecoderGenerator(folder / "onnx" / "model.onnx")
    assert len(gen.past_names) == 2 * 2 and gen.kv_heads == 2 and gen.head_dim == 16
    parity = decode_parity(model, folder / "onnx" / "model.onnx", PROMPT, steps=6)
    assert len(parity["per_step"]) == 7
    assert parity["max_abs_diff"] < 1e-4 and parity["greedy_agree"]


def test_runtime_generate_equals_transformers_greedy_generate(tiny_llama) -> None:
    model, folder = tiny_llama
    gen = DecoderGenerator(folder / "onnx" / "model.onnx", eos_token_ids=[2])
    with torch.inference_mode():
        want = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=2)
    ids, first, decode, why = gen.generate_ids(PROMPT, max_new_tokens=10)
    assert ids == want[0, len(PROMPT) :].tolist()
    assert why in ("eos", "max_new_tokens") and first > 0 and (decode > 0 or len(ids) == 1)
    # a stop rule ends generation early, after the token that satisfied it
    ids3, _, _, why3 = gen.generate_ids(PROMPT, max_new_tokens=10, stop=lambda out: len(out) >= 3)
    assert why3 == "stop string" and ids3 == ids[:3]


SHARED = [1, 17, 250, 3, 99]
BATCH = [[*SHARED, 400, 12], [*SHARED, 7], [*SHARED, 31, 32, 33, 34, 35, 36], [1, 18, 250, 5], [*SHARED, 44, 45]]


def _decoders(folder: Path) -> list[DecoderGenerator]:
    from toolchain.llm.torch_decoder import TorchDecoder

    return [
        DecoderGenerator(folder / "onnx" / "model.onnx", eos_token_ids=[2]),
        TorchDecoder(folder / "hf", eos_token_ids=[2]),
    ]


@pytest.mark.parametrize("backend", [0, 1], ids=["onnx", "torch"])
def test_a_batch_with_a_shared_prefix_and_padding_equals_one_prompt_at_a_time(tiny_llama, backend: int) -> None:
    """Padding sits between the cached prefix and each prompt's own tokens: masked out, positions explicit. Every
    row's first logits and greedy continuation must equal that prompt run alone from an empty cache."""
    _, folder = tiny_llama
    gen = _decoders(folder)[backend]
    alone_logits = [gen.step(np.array([p]), gen.empty_past(), len(p))[0] for p in BATCH[:3] + BATCH[4:]]
    alone = [gen.generate_ids(p, max_new_tokens=6)[0] for p in BATCH]
    gen.set_prefix(SHARED)
    assert gen.prefix_ids == SHARED
    logits, _, mask, nxt = gen._prefill(BATCH[:3] + BATCH[4:])  # all extend the prefix: it is used
    assert mask.shape == (4, len(SHARED) + 6) and mask[:, : len(SHARED)].all() and nxt.tolist() == [7, 6, 11, 7]
    np.testing.assert_allclose(logits, np.stack(alone_logits), atol=1e-4)
    assert gen.generate_batch_ids(BATCH, max_new_tokens=6) == alone  # one row does not extend it: run whole
    assert gen.generate_batch_ids(BATCH[:3], max_new_tokens=6) == alone[:3]
    assert [gen.generate_ids(p, max_new_tokens=6)[0] for p in BATCH] == alone
    stop = gen.generate_batch_ids(BATCH[:2], max_new_tokens=6, stop=lambda out: len(out) >= 2)
    assert stop == [a[:2] for a in alone[:2]]
    with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1"):
        gen.generate_batch(["a prompt"], batch_size=0)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate_batch_ids([SHARED, []])
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        gen.generate_ids(SHARED, max_new_tokens=0)


def test_the_pytorch_decoder_times_and_answers_like_transformers_generate(tiny_llama) -> None:
    model, folder = tiny_llama
    gen = _decoders(folder)[1]
    with torch.inference_mode():
        want = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=2)
    ids, first, _, _ = gen.generate_ids(PROMPT, max_new_tokens=10)
    assert ids == want[0, len(PROMPT) :].tolist() and first > 0


def test_common_prefix_leaves_every_sequence_a_token_of_its_own() -> None:
    from toolchain.runtime import common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]) == [1, 2, 3]
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert common_prefix([[5, 6], [7, 6]]) == [] and common_prefix([]) == []


def test_int4_weights_keep_the_logits_close(tiny_llama, tmp_path: Path) -> None:
    import onnx

    _, folder = tiny_llama
    src = folder / "onnx" / "model.onnx"
    out = tmp_path / "model.int4.onnx"
    matmul_nbits(src, out, block_size=32, accuracy_level=4)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulNBits") >= 2 * 7  # q, k, v, o, gate, up, down in each layer
    assert out.stat().st_size < src.stat().st_size
    fp32 = DecoderGenerator(src)
    int4 = DecoderGenerator(out)
    a, _ = fp32.step(np.array([PROMPT]), fp32.empty_past(), len(PROMPT))
    b, _ = int4.step(np.array([PROMPT]), int4.empty_past(), len(PROMPT))
    assert np.corrcoef(a, b)[0, 1] > 0.9  # 4-bit weights perturb the logits, not their shape


def test_prompt_task_parses_answers_and_trains_only_on_the_answer(tiny_llama) -> None:
    from toolchain.llm.task import PromptTask, answer_loss

    task = PromptTask(["negative", "positive"], template="Review: {text}\nSentiment:", chat=False)
    assert task.parse(" Positive.") == 1 and task.parse("negative, clearly") == 0
    assert task.parse("The sentiment of this review is negative, not positive") == 0  # the first label word
    assert task.parse("The sentiment of this review") is None and task.parse("") is None
    assert task.parse("nonnegative") is None  # whole words only
    model, _ = tiny_llama
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss_fn = answer_loss([2, 1])  # row 0: the last 2 tokens are the answer; row 1: its last real token
    base = loss_fn(model, {"input_ids": ids, "attention_mask": mask}, [0, 1])
    assert torch.isfinite(base)
    # changing a prompt token changes the inputs but not the targets; changing an answer token changes the loss
    # through its target: only the answer positions are scored
    changed_answer = ids.clone()
    changed_answer[0, 4] = 42
    assert not torch.isclose(loss_fn(model, {"input_ids": changed_answer, "attention_mask": mask}, [0, 1]), base)
    padded = ids.clone()
    padded[1, 3:] = 77  # padding positions are never targets
    assert torch.isclose(loss_fn(model, {"input_ids": padded, "attention_mask": mask}, [0, 1]), base)


def test_untying_the_lm_head_keeps_the_function_and_lets_int4_take_it(tiny_llama, tmp_path: Path) -> None:
    import onnx

    from toolchain.llm.export import untie_weights

    _, folder = tiny_llama
    src = folder / "onnx" / "model.onnx"
    untied = tmp_path / "untied.onnx"
    changed = untie_weights(src, untied)
    assert changed and any("lm_head" in name for name in changed)
    a, b = DecoderGenerator(src), DecoderGenerator(untied)
    la, _ = a.step(np.array([PROMPT]), a.empty_past(), len(PROMPT))
    lb, _ = b.step(np.array([PROMPT]), b.empty_past(), len(PROMPT))
    assert np.array_equal(la, lb)
    tied_q, untied_q = tmp_path / "tied.int4.onnx", tmp_path / "untied.int4.onnx"
    matmul_nbits(src, tied_q)
    matmul_nbits(untied, untied_q)

    def nbits(p: Path) -> int:
        return [n.op_type for n in onnx.load(str(p)).graph.node].count("MatMulNBits")

    assert nbits(untied_q) == nbits(tied_q) + len(changed)


def test_int4_only_restricts_the_quantized_matmuls(tiny_llama, tmp_path: Path) -> None:
    """onnxruntime's nodes_to_include adds to the op types instead of restricting them; `only` must restrict (the
    per-node sensitivity ranking quantizes one node at a time through it)."""
    import onnx

    _, folder = tiny_llama
    src = folder / "onnx" / "model.onnx"
    names = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "MatMul"]
    target = next(n for n in names if "down_proj" in n)
    matmul_nbits(src, tmp_path / "one.onnx", only=[target])
    quantized = [n.name for n in onnx.load(str(tmp_path / "one.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert quantized == [target + "_Q4"]
    matmul_nbits(src, tmp_path / "all-but.onnx", exclude=[target])
    graph = onnx.load(str(tmp_path / "all-but.onnx")).graph
    assert target in [n.name for n in graph.node if n.op_type == "MatMul"]
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 7 - 1  # 2 layers x 7 projections, one kept
