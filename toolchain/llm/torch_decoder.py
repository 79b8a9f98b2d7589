"""PyTorch eager through the runtime's greedy loops: the baseline's answers and timings come from the same code as
the ONNX variants' (prefix cache, padding inside a batch, stopping), so only the model differs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolchain.runtime import DecoderGenerator


class TorchDecoder(DecoderGenerator):
    """A transformers causal LM (fp32, eval mode) behind DecoderGenerator's interface; the cache is transformers'
    DynamicCache."""

    def __init__(
        self,
        model_dir: Path | str,
        tokenizer_file: Path | str | None = None,
        threads: int | None = None,
        eos_token_ids: list[int] | None = None,
    ):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.can_pad = True
        self._setup_text(tokenizer_file, eos_token_ids)

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        with torch.inference_mode():
            res = self.model(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                position_ids=torch.from_numpy(positions.astype(np.int64)),
                past_key_values=past,
                use_cache=True,
            )
            return res.logits[:, -1].float().numpy(), res.past_key_values

    def empty_past(self, batch: int = 1) -> Any:
        return None  # the model starts a DynamicCache

    def repeat_past(self, past: Any, batch: int) -> Any:
        """A copy (a forward pass appends to a DynamicCache in place), repeated along the batch."""
        with torch.inference_mode():
            cache = copy.deepcopy(past)
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            return cache
