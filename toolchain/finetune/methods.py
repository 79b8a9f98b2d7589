"""What the finetune stage (toolchain/stages/finetune.py) uses: the methods by name, freezing, the agreement check of
the replicas under torchrun, where a QAT model keeps its fake-quant state."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from toolchain.errors import StageError
from toolchain.finetune import full, lora, qat, qlora
from toolchain.finetune.train import pad_batch
from toolchain.recipe.schema import FreezeSection

log = logging.getLogger("toolchain")

METHODS = {"full": full, "lora": lora, "qlora": qlora, "qat": qat}
QAT_STATE = "qat_state.safetensors"
AGREEMENT_ROWS = 32


def apply_freeze(model: torch.nn.Module, freeze: FreezeSection) -> int:
    """Freeze the embeddings and/or the first N encoder layers (with what the encoder shares across its layers);
    returns how many parameters were frozen."""
    frozen = 0
    prefixes = []
    if freeze.embeddings:
        prefixes.append("embeddings.")
    prefixes += [f"encoder.layer.{i}." for i in range(freeze.layers)]
    if not prefixes:
        return 0
    layer_frozen = False
    for name, p in model.named_parameters():
        if any(f".{pre}" in f".{name}" for pre in prefixes) and p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
            layer_frozen = layer_frozen or ".encoder.layer." in f".{name}"
    if layer_frozen:
        # what the encoder shares with every layer (MPNet's relative position bias, DeBERTa's relative embeddings)
        # feeds the frozen layers too: fixed with them, so the backward pass stops at the first trainable layer
        for name, p in model.named_parameters():
            if ".encoder." in f".{name}" and ".encoder.layer." not in f".{name}" and p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    if frozen == 0:
        raise StageError(
            "finetune",
            "finetune.freeze matched no parameters: this model has no 'embeddings' or 'encoder.layer.N' "
            "modules; remove the freeze section for this model",
        )
    return frozen


def rank_predictions(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> list[list[int]] | None:
    """Every rank's predictions on the same rows (None outside torchrun): the replicas must agree."""
    if not dist.is_initialized():
        return None
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    batch = pad_batch(ids, tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    with torch.inference_mode():
        pred = model.eval()(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).tolist()
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, pred)
    return views
