"""The finetune stage: load the source model the method's way, freeze what the recipe says, train with the one
loop, fold the result into a plain transformers model, save it (rank 0 only under torchrun)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoTokenizer

from toolchain.data import load_validation
from toolchain.errors import StageError
from toolchain.finetune import full, lora, qat, qlora
from toolchain.finetune.train import pad_batch, seed_everything, train_classifier
from toolchain.models import copy_tokenizer, resolve_source, trust_kwargs
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.recipe import FreezeSection
from toolchain.registry import register

log = logging.getLogger("toolchain")

METHODS = {"full": full, "lora": lora, "qlora": qlora, "qat": qat}
QAT_STATE = "qat_state.safetensors"
AGREEMENT_ROWS = 32


def apply_freeze(model: torch.nn.Module, freeze: FreezeSection) -> int:
    """Freeze the embeddings and/or the first N encoder layers; returns how many parameters were frozen."""
    frozen = 0
    prefixes = []
    if freeze.embeddings:
        prefixes.append("embeddings.")
    prefixes += [f"encoder.layer.{i}." for i in range(freeze.layers)]
    if not prefixes:
        return 0
    for name, p in model.named_parameters():
        if any(f".{pre}" in f".{name}" for pre in prefixes) and p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    if frozen == 0:
        raise StageError(
            "finetune",
            "finetune.freeze matched no parameters: this model has no 'embeddings' or 'encoder.layer.N' "
            "modules; remove the freeze section for this model",
        )
    return frozen


def _rank_predictions(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> list[list[int]] | None:
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


@register(
    "finetune",
    kind="hf-model",
    help="Fine-tune the source model on the train split (full, lora, qlora, qat).",
    version=2,  # 2: QAT keeps Linear outputs in float
)
def finetune(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    recipe = ctx.recipe
    cfg = recipe.finetune
    labels = recipe.data.labels
    src = resolve_source(recipe.model.source, recipe.model)
    trust = trust_kwargs(src, recipe.model)
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust["trust_remote_code"])
    method = METHODS[cfg.method]
    model = method.load(src, labels, cfg, **trust)
    frozen = apply_freeze(model, cfg.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("finetune: %s on %d rows, %d of %d parameters trainable", cfg.method, len(ctx.train), trainable, total)
    hook = method.on_step(cfg) if hasattr(method, "on_step") else None
    stats = train_classifier(
        model, tokenizer, ctx.train, cfg, load_validation(recipe), on_step=hook, checkpoints=ctx.checkpoint_dir
    )
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    if cfg.method == "qat" and main_rank:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out / QAT_STATE))
    model = method.finalize(model, src, labels, cfg, **trust).to("cpu").float()
    views = _rank_predictions(model, tokenizer, ctx.eval.texts[:AGREEMENT_ROWS])
    if main_rank:
        model.save_pretrained(out, safe_serialization=True)
        copy_tokenizer(src, out)
        (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    meta = {
        "method": cfg.method,
        "trainable_parameters": trainable,
        "parameters": total,
        "frozen_parameters": frozen,
        **{k: v for k, v in stats.items() if k not in ("loss_curve", "validation_curve")},
    }
    if views is not None:
        meta["rank_predictions"] = views
        meta["ranks_agree"] = all(v == views[0] for v in views)
    return meta
