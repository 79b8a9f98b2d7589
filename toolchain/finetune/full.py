"""Full fine-tuning: every weight trains; nothing to wrap or merge."""

from __future__ import annotations

import torch

from toolchain.recipe import FinetuneSection


def prepare(model: torch.nn.Module, cfg: FinetuneSection) -> torch.nn.Module:
    return model


def finalize(model: torch.nn.Module) -> torch.nn.Module:
    return model
