"""Full fine-tuning: every weight trains; nothing to wrap or merge."""

from __future__ import annotations

from pathlib import Path

import torch

from toolchain.models import load_classifier
from toolchain.recipe.schema import FinetuneSection


def load(src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool) -> torch.nn.Module:
    return load_classifier(src, labels, **trust)


def finalize(
    model: torch.nn.Module, src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool
) -> torch.nn.Module:
    return model
