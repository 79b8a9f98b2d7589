"""Fine-tuning a token classifier on tagged words: each word's tag is learned at its first sub-token (the others and
the special tokens are ignored), cross-entropy, through the shared short loop (toolchain.finetune.loop)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toolchain import model_inputs
from toolchain.data import Split
from toolchain.finetune.loop import fit
from toolchain.runtime import TextEncoder, encode_words

IGNORE = -100  # the loss skips these positions


def aligned_labels(firsts: list[list[int]], tags: list[list[int]], width: int) -> np.ndarray:
    """(B, width) targets: each word's tag at its first sub-token, IGNORE elsewhere."""
    out = np.full((len(firsts), width), IGNORE, dtype=np.int64)
    for i, (positions, ids) in enumerate(zip(firsts, tags, strict=True)):
        for pos, tag in zip(positions, ids, strict=True):
            if pos >= 0:
                out[i, pos] = tag
    return out


def train_tagger(model: Any, encoder: TextEncoder, train: Split, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train `model` (a transformers token classifier) in place; the steps, the last tenth's mean loss, seconds."""
    assert train.words is not None and train.tags is not None
    words, tags = train.words, train.tags
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(words, is_pretokenized=True)]
    takes = model_inputs.forward_inputs(model)

    def batch_loss(rows: list[int]) -> torch.Tensor:
        feeds, firsts = encode_words(encoder, [words[i] for i in rows])
        targets = aligned_labels(firsts, [tags[i] for i in rows], feeds["input_ids"].shape[1])
        batch = {k: torch.from_numpy(v) for k, v in model_inputs.select(feeds, takes).items()}
        return model(**batch, labels=torch.from_numpy(targets)).loss  # type: ignore[no-any-return]

    return fit(model, lengths, cfg, batch_loss, "tag loss")
