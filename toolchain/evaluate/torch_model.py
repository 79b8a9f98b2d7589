"""A fine-tuned classifier in PyTorch, loaded and fed like its ONNX export. Light on purpose: the PyTorch timing
process imports it, and what it imports adds to the cold start and memory it measures (torch and transformers only,
never the recipe schema or the engine)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import model_inputs
from toolchain.runtime import TextEncoder


def load_pytorch(model_dir: Path) -> Any:
    """The classifier saved in `model_dir`: a sequence classifier, a token classifier, or the embedder (encoder with
    its pooling) when the folder is one."""
    from toolchain.embed.model import is_embedder, load_embedder

    if is_embedder(model_dir):
        return load_embedder(model_dir)
    import json

    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return AutoModelForTokenClassification.from_pretrained(model_dir, use_safetensors=True).eval()

    return AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()


def pytorch_logits(
    model: Any,
    encoder: TextEncoder,
    texts: list[str],
    batch_size: int = 1,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Logits (N, labels) of a transformers model, fed exactly the arrays the ONNX runtime is fed, batched the same."""
    import torch

    order = np.argsort(encoder.lengths(texts), kind="stable")
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    takes = model_inputs.forward_inputs(model)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feeds = model_inputs.select(encoder.encode([texts[i] for i in idx]), takes)
            out[idx] = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.float().numpy()
            if on_batch is not None:
                on_batch(len(idx))
    return out


def pytorch_embeddings(
    model: Any,
    encoder: TextEncoder,
    texts: list[str],
    batch_size: int = 1,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Embeddings (N, d) of an embedder (toolchain.embed.model.Pooled), fed exactly the arrays the ONNX runtime is
    fed, in batches of similar length."""
    import torch

    order = np.argsort(encoder.lengths(texts), kind="stable")
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            got = model.embed(encoder.encode([texts[i] for i in idx])).numpy()
            if out is None:
                out = np.zeros((len(texts), got.shape[1]), dtype=np.float32)
            out[idx] = got
            if on_batch is not None:
                on_batch(len(idx))
    return out if out is not None else np.zeros((0, 0), np.float32)
