"""FFN pruning (compile.distill.intermediate_size): which neurons stay, what the pruned block computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from toolchain.compile.distill import layer_list
from toolchain.compile.prune import ffn_importance, prune_ffn
from toolchain.errors import StageError


def _model(tiny_model: Path) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()


def test_the_pruned_block_computes_what_the_kept_neurons_did(tiny_model: Path) -> None:
    model = _model(tiny_model)
    _, layers = layer_list(model)
    block = layers[0]
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        full = block.intermediate(x)  # (2, 5, 64) activations
    scores = [torch.arange(64, dtype=torch.float32) for _ in layers]  # the last 24 neurons matter most
    prune_ffn(model, layers, 24, scores)
    assert model.config.intermediate_size == 24
    assert block.intermediate.dense.weight.shape == (24, model.config.hidden_size)
    assert block.output.dense.weight.shape == (model.config.hidden_size, 24)
    with torch.no_grad():
        assert torch.allclose(block.intermediate(x), full[..., 40:], atol=1e-6)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    assert model(input_ids=ids).logits.shape == (1, 2)


def test_importance_ranks_neurons_by_activation_and_outgoing_weight(tiny_model: Path) -> None:
    model = _model(tiny_model)
    _, layers = layer_list(model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with torch.no_grad():
        layers[1].output.dense.weight[:, 7] = 0.0  # a neuron whose output goes nowhere
        layers[1].output.dense.weight[:, 9] *= 100.0
    scores = ffn_importance(model, layers, tokenizer, ["a fine film", "dull and slow", "ok"], 16)
    assert [s.shape for s in scores] == [(64,), (64,)]
    assert scores[1][7] == 0 and int(scores[1].argmax()) == 9


def test_a_width_the_model_does_not_exceed_is_refused(tiny_model: Path) -> None:
    model = _model(tiny_model)
    _, layers = layer_list(model)
    with pytest.raises(StageError, match="intermediate_size 64: the model's FFN has 64 neurons"):
        prune_ffn(model, layers, 64, [torch.ones(64) for _ in layers])
