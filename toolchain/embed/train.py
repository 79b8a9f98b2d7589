"""Fine-tuning an embedder on scored pairs with the cosine-similarity loss (sentence-transformers' CosineSimilarityLoss:
the MSE between cos(u, v) and score / score_max), through the shared short loop (toolchain.finetune.loop)."""

from __future__ import annotations

from typing import Any

import torch

from toolchain.data import Split
from toolchain.embed.model import Pooled
from toolchain.finetune.loop import fit
from toolchain.runtime import TextEncoder

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_on_pairs(
    model: Pooled, encoder: TextEncoder, train: Split, cfg: dict[str, Any], score_max: float
) -> dict[str, Any]:
    """Train `model` in place; returns the steps, the mean loss of the last tenth of the steps and the seconds."""
    assert train.pairs is not None
    firsts, seconds = train.texts, train.pairs
    targets = torch.as_tensor(train.labels / score_max, dtype=torch.float32)
    lengths = [a + b for a, b in zip(encoder.lengths(firsts), encoder.lengths(seconds), strict=True)]
    dtype = AUTOCAST[cfg["precision"]]

    def batch_loss(rows: list[int]) -> torch.Tensor:
        a = encoder.encode([firsts[i] for i in rows])
        b = encoder.encode([seconds[i] for i in rows])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            cos = torch.nn.functional.cosine_similarity(model.embed(a), model.embed(b))
        return torch.nn.functional.mse_loss(cos.float(), targets[rows])

    return fit(model, lengths, cfg, batch_loss, "cosine loss")
