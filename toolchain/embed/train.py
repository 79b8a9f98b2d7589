"""Fine-tuning an embedder on scored pairs with the cosine-similarity loss (sentence-transformers' CosineSimilarityLoss:
the MSE between cos(u, v) and score / score_max), in length-bucketed batches with AdamW and a linear warm-up and
decay. A few minutes on STS-B's 5,749 pairs, so it keeps no resumable checkpoints: an interrupted run trains again."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from toolchain.data import Split, bucketed_batches
from toolchain.embed.model import Pooled
from toolchain.runtime import TextEncoder

log = logging.getLogger("toolchain")

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_on_pairs(
    model: Pooled, encoder: TextEncoder, train: Split, cfg: dict[str, Any], score_max: float
) -> dict[str, Any]:
    """Train `model` in place; returns the steps, the mean loss of the last tenth of the steps and the seconds."""
    assert train.pairs is not None
    torch.manual_seed(cfg["seed"])
    firsts, seconds, targets = train.texts, train.pairs, torch.as_tensor(train.labels / score_max, dtype=torch.float32)
    lengths = [a + b for a, b in zip(encoder.lengths(firsts), encoder.lengths(seconds), strict=True)]
    per_epoch = math.ceil(len(firsts) / cfg["batch_size"])
    total = max(1, math.ceil(per_epoch * cfg["epochs"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    schedule = get_linear_schedule_with_warmup(optimizer, int(total * cfg["warmup_ratio"]), total)
    dtype = AUTOCAST[cfg["precision"]]
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc="finetune (cosine loss)", unit="step", mininterval=2.0)
    step, epoch = 0, 0
    while step < total:
        for idx in bucketed_batches(lengths, cfg["batch_size"], cfg["seed"] + epoch):
            if step >= total:
                break
            a = encoder.encode([firsts[i] for i in idx])
            b = encoder.encode([seconds[i] for i in idx])
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                cos = torch.nn.functional.cosine_similarity(model.embed(a), model.embed(b))
            loss = torch.nn.functional.mse_loss(cos.float(), targets[idx])
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
    seconds_taken = time.perf_counter() - start
    log.info("finetune: %d steps in %.0f s, cosine loss (last tenth) %.4f", step, seconds_taken, sum(tail) / len(tail))
    return {"steps": step, "final_loss": sum(tail) / len(tail), "train_seconds": round(seconds_taken, 1)}
