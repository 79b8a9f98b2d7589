"""The one training loop every fine-tuning method uses: length-bucketed batches, AdamW, linear warm-up and decay,
autocast, gradient clipping, a tqdm bar. Methods differ only in how they wrap the model before and after."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from toolchain.data import Split, bucketed_batches
from toolchain.recipe import FinetuneSection

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to the longest one: input_ids and attention_mask, each (B, T)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.as_tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def train_classifier(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, train: Split, cfg: FinetuneSection
) -> dict[str, Any]:
    """Train `model` in place on `train`; returns the loss curve and timings."""
    ids = tokenizer(train.texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    lengths = [len(x) for x in ids]
    batches_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total_steps = max(1, math.ceil(batches_per_epoch * cfg.epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    dtype = AUTOCAST[cfg.precision]
    labels = torch.as_tensor(train.labels)

    def batches():
        epoch = 0
        while True:
            yield from bucketed_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
            epoch += 1

    model.train()
    curve: list[dict[str, float]] = []
    running, tokens, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc="finetune", unit="step", mininterval=2.0)
    for step, rows in zip(range(total_steps), batches(), strict=False):
        batch = pad_batch([ids[i] for i in rows], tokenizer.pad_token_id or 0)  # (B, T), T = longest in batch
        tokens += int(batch["attention_mask"].sum())
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(**batch, labels=labels[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 50 == 0 or step + 1 == total_steps:
            n = (step % 50) + 1
            curve.append({"step": step + 1, "loss": round(running / n, 5), "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{running / n:.4f}")
            running = 0.0
        bar.update(1)
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    return {
        "steps": total_steps,
        "rows": len(ids),
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "loss_curve": curve,
    }
