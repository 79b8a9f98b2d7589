"""A sentence embedder in PyTorch: a transformers encoder whose token states are mean-pooled over the attention mask
and L2-normalized, in one module, so that PyTorch, its ONNX export and the bundle compute the same vector.

Light to import (torch and transformers only): the PyTorch timing process of the bench loads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from toolchain import model_inputs

EMBEDDING_FILE = "embedding.json"  # beside config.json: what makes a model folder an embedder, and how it pools


class Pooled(torch.nn.Module):
    """encoder -> mean over the attention mask -> L2 normalization (optional): (B, T) token ids -> (B, d) float32.

    Its inputs are the encoder's own text inputs (`input_names`, in model_inputs.TEXT_INPUTS order: BERT takes
    segment ids, MPNet does not), taken positionally so that torch.onnx.export names them."""

    def __init__(self, encoder: Any, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize
        self.input_names = model_inputs.forward_inputs(encoder)
        self.config = encoder.config

    def forward(self, *arrays: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.input_names, arrays, strict=True))
        hidden = self.encoder(**feeds).last_hidden_state
        mask = feeds["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.float()

    def embed(self, feeds: dict[str, Any]) -> torch.Tensor:
        """Embeddings for a dict of (B, T) arrays or tensors holding at least this encoder's inputs."""
        return self(*(torch.as_tensor(feeds[n]) for n in self.input_names))


def is_embedder(folder: Path) -> bool:
    return (folder / EMBEDDING_FILE).is_file()


def pooling_settings(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / EMBEDDING_FILE).read_text()))


def load_embedder(folder: Path, **kwargs: Any) -> Pooled:
    """The embedder saved in `folder` (config.json, safetensors weights, embedding.json), in eval mode."""
    from transformers import AutoModel

    settings = pooling_settings(folder)
    encoder = AutoModel.from_pretrained(folder, use_safetensors=True, **kwargs)
    return Pooled(encoder, normalize=settings["normalize"]).eval()


def save_embedder(model: Pooled, out: Path, pooling: str) -> None:
    """Save the encoder's weights and config, and embedding.json with the pooling, in `out`."""
    model.encoder.save_pretrained(out, safe_serialization=True)
    (out / EMBEDDING_FILE).write_text(json.dumps({"pooling": pooling, "normalize": model.normalize}))
