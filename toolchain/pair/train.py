"""Fine-tuning a cross-encoder: (text, text_pair) read together by a sequence classifier; cross-entropy over the labels,
or (regression) the MSE between its one output and score / score_max; through the shared short loop."""

from __future__ import annotations

from typing import Any

import torch

from toolchain import model_inputs
from toolchain.data import Split, text_items
from toolchain.finetune.loop import fit
from toolchain.runtime import TextEncoder


def train_cross_encoder(
    model: Any, encoder: TextEncoder, train: Split, cfg: dict[str, Any], regression: bool, score_max: float
) -> dict[str, Any]:
    """Train `model` in place; the steps, the last tenth's mean loss and the seconds."""
    items = text_items(train)
    lengths = encoder.lengths(items)
    takes = model_inputs.forward_inputs(model)
    labels = torch.as_tensor(train.labels / score_max if regression else train.labels)

    def batch_loss(rows: list[int]) -> torch.Tensor:
        feeds = model_inputs.select(encoder.encode([items[i] for i in rows]), takes)
        logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
        if regression:
            return torch.nn.functional.mse_loss(logits[:, 0].float(), labels[rows].float())
        return torch.nn.functional.cross_entropy(logits.float(), labels[rows].long())

    return fit(model, lengths, cfg, batch_loss, "MSE" if regression else "cross-entropy")
