"""The short training loop the embedding, tagging and pair tasks share: length-bucketed batches of row indices in a
seeded order, AdamW with a linear warm-up and decay, gradient clipping, a tqdm bar. The task gives the loss of a batch
of rows. It keeps no resumable checkpoints: these runs take minutes, and an interrupted one trains again (the
classifier's loop, toolchain.finetune.train, is the resumable one)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from toolchain.data import bucketed_batches
from toolchain.finetune.train import adamw

log = logging.getLogger("toolchain")


def fit(
    model: torch.nn.Module,
    lengths: list[int],
    cfg: dict[str, Any],
    batch_loss: Callable[[list[int]], torch.Tensor],
    what: str,
) -> dict[str, Any]:
    """Train `model` in place for cfg's epochs over rows of the given token `lengths`; `batch_loss(rows)` is the loss
    of one batch. Returns the steps, the mean loss of the last tenth of them and the seconds."""
    torch.manual_seed(cfg["seed"])
    total = max(1, math.ceil(math.ceil(len(lengths) / cfg["batch_size"]) * cfg["epochs"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg["lr"], cfg["weight_decay"])
    schedule = get_linear_schedule_with_warmup(optimizer, int(total * cfg["warmup_ratio"]), total)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"finetune ({what})", unit="step", mininterval=2.0)
    step, epoch = 0, 0
    while step < total:
        for rows in bucketed_batches(lengths, cfg["batch_size"], cfg["seed"] + epoch):
            if step >= total:
                break
            loss = batch_loss(rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
        epoch += 1
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    seconds = time.perf_counter() - start
    log.info("finetune: %d steps in %.0f s, %s (last tenth) %.4f", step, seconds, what, sum(tail) / len(tail))
    return {"steps": step, "final_loss": sum(tail) / len(tail), "train_seconds": round(seconds, 1)}
