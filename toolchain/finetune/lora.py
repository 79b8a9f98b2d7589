"""LoRA through peft: adapters on the chosen linear layers, the head trained in full, merged for export."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from toolchain.models import load_classifier
from toolchain.recipe.schema import FinetuneSection


def lora_config(model: torch.nn.Module, cfg: FinetuneSection) -> LoraConfig:
    assert cfg.lora is not None  # filled in by the recipe validator
    names = {n for n, _ in model.named_modules()}
    to_save = [m for m in cfg.lora.modules_to_save if any(n == m or n.endswith("." + m) for n in names)]
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        modules_to_save=to_save,
    )


def load(src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool) -> torch.nn.Module:
    model = load_classifier(src, labels, **trust)
    return get_peft_model(model, lora_config(model, cfg))


def finalize(
    model: torch.nn.Module, src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool
) -> torch.nn.Module:
    """Fold the adapters into the base weights: the export sees a plain transformers model."""
    assert isinstance(model, PeftModel)
    return model.merge_and_unload()
