"""Structured pruning of the feed-forward blocks: keep each layer's most important FFN neurons, drop the rest.

A neuron's importance is its mean absolute activation over the real tokens of some training rows times the L2 norm
of its outgoing weights (what it contributes to the residual stream). The first and second FFN projections lose the
same rows/columns, so the pruned block is a smaller dense block (a smaller `intermediate_size` in the config) that
every exporter and runtime runs unchanged. Distillation then recovers what was lost.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from toolchain.errors import StageError
from toolchain.finetune.train import pad_batch

log = logging.getLogger("toolchain")

# (FFN input projection, FFN output projection, the config field holding their width), by transformers model family
FFN_LAYOUTS = {
    "bert-like": ("intermediate.dense", "output.dense", "intermediate_size"),  # BERT, RoBERTa, ELECTRA, MiniLM
    "distilbert": ("ffn.lin1", "ffn.lin2", "hidden_dim"),
}


def ffn_layout(block: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear, str]:
    """The two FFN projections of a transformer block and the config field of their width."""
    for first, second, field in FFN_LAYOUTS.values():
        try:
            a, b = block.get_submodule(first), block.get_submodule(second)
        except AttributeError:
            continue
        if isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear):
            return a, b, field
    raise StageError(
        "distill",
        f"compile.distill.intermediate_size: cannot find the feed-forward projections of {type(block).__name__} "
        f"(known layouts: {', '.join(f'{a} + {b}' for a, b, _ in FFN_LAYOUTS.values())}); remove intermediate_size",
    )


def ffn_importance(
    model: torch.nn.Module, layers: torch.nn.ModuleList, tokenizer: Any, texts: list[str], max_length: int
) -> list[torch.Tensor]:
    """Per layer, each FFN neuron's mean |activation| over real tokens x the norm of its outgoing weights."""
    sums = [torch.zeros(ffn_layout(b)[0].out_features, dtype=torch.float64) for b in layers]
    tokens = 0
    mask: torch.Tensor | None = None

    def hook(i: int) -> Any:
        def record(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            assert mask is not None  # the activation is what enters the second projection
            sums[i] += (inp[0].abs().float() * mask[..., None]).sum((0, 1)).double()

        return record

    handles = [ffn_layout(b)[1].register_forward_pre_hook(hook(i)) for i, b in enumerate(layers)]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), 64):
                batch = pad_batch([ids[i] for i in order[start : start + 64]], tokenizer.pad_token_id or 0)
                mask = batch["attention_mask"].float()
                tokens += int(mask.sum())
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [
        (s / max(tokens, 1)).float() * ffn_layout(b)[1].weight.detach().float().norm(dim=0)
        for s, b in zip(sums, layers, strict=True)
    ]


def prune_ffn(model: torch.nn.Module, layers: torch.nn.ModuleList, keep: int, importance: list[torch.Tensor]) -> None:
    """Keep the `keep` most important neurons of every layer's FFN (in their original order); the config follows."""
    field = ""
    for block, scores in zip(layers, importance, strict=True):
        first, second, field = ffn_layout(block)
        if keep >= first.out_features:
            raise StageError(
                "distill",
                f"compile.distill.intermediate_size {keep}: the model's FFN has {first.out_features} neurons; "
                "set a smaller width or remove intermediate_size",
            )
        idx = torch.topk(scores, keep).indices.sort().values
        with torch.no_grad():
            first.weight = torch.nn.Parameter(first.weight[idx].clone())
            if first.bias is not None:
                first.bias = torch.nn.Parameter(first.bias[idx].clone())
            second.weight = torch.nn.Parameter(second.weight[:, idx].clone())
        first.out_features = second.in_features = keep
    setattr(model.config, field, keep)
    log.info("distill: kept the %d most important of each layer's FFN neurons", keep)
