"""The finetune stage: load the source model with a fresh head, train it with the recipe's method, save it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from toolchain.finetune import full, lora
from toolchain.finetune.train import seed_everything, train_classifier
from toolchain.models import copy_tokenizer, resolve_source
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register

log = logging.getLogger("toolchain")

METHODS = {"full": full, "lora": lora}


def load_classifier(folder: Path, labels: list[str]) -> torch.nn.Module:
    """A sequence classifier from a model folder, safetensors only, with the recipe's label names."""
    return AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        use_safetensors=True,
        trust_remote_code=False,
    )


@register("finetune", kind="hf-model", help="Fine-tune the source model on the train split (full or LoRA).")
def finetune(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    recipe = ctx.recipe
    cfg = recipe.finetune
    src = resolve_source(recipe.model.source)
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = METHODS[cfg.method].prepare(load_classifier(src, recipe.data.labels), cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("finetune: %s on %d rows, %d of %d parameters trainable", cfg.method, len(ctx.train), trainable, total)
    stats = train_classifier(model, tokenizer, ctx.train, cfg)
    model = METHODS[cfg.method].finalize(model)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(src, out)
    (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    return {
        "method": cfg.method,
        "trainable_parameters": trainable,
        "parameters": total,
        **{k: v for k, v in stats.items() if k != "loss_curve"},
    }
