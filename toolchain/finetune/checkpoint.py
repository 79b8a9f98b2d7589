"""Resumable training checkpoints: what the training loop needs to go on exactly where it stopped.

A checkpoint is a folder `step-NNNNNNN/` in the stage's checkpoint folder (`runs/<recipe>/stages/.checkpoints/
<stage>-<id>/`, keyed by the stage id, so a checkpoint is only ever resumed by the same configuration):

    weights.safetensors   what training changes (trainable parameters, float buffers such as QAT observers)
    best.safetensors      the best-on-validation weights so far, when validation keeps them
    state.pt              optimizer and scheduler state dicts (tensors and numbers: loaded with weights_only=True)
    rng-rank<R>.pt        each rank's torch RNG state (the dropout masks to come), + numpy/python RNG in state.json
    state.json            step, loss/validation curves, best step and accuracy, early-stopping count, counters

It is written into `.tmp-step-NNNNNNN/` and renamed into place, so a kill while saving leaves the previous
checkpoint as the latest; only the latest is kept. The data position is the step: batch order is a function of the
seed and the epoch, so the loop skips the batches already taken. Nothing here loads a pickle that can run code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("toolchain")


@dataclass
class LoopState:
    """The training loop's own variables, beside the model/optimizer/scheduler."""

    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    val_curve: list[dict[str, float]] = field(default_factory=list)
    best_accuracy: float = -1.0
    best_step: int = 0
    best: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    running: float = 0.0
    tokens: int = 0
    seconds: float = 0.0  # training time before this process took over


def latest(folder: Path | None) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    if folder is None or not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(data: dict[str, Any]) -> None:
    version, state, gauss = data["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save(
    folder: Path,
    loop: LoopState,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    world: int = 1,
    barrier: Any = None,
) -> Path:
    """Write the checkpoint for `loop.step` atomically and drop the older ones. Under torchrun every rank calls it
    (each saves its RNG; rank 0 the rest) with `barrier` synchronising them."""
    name = f"step-{loop.step:07d}"
    tmp = folder / f".tmp-{name}"
    sync = barrier or (lambda: None)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        sync()
    torch.save({"torch": torch.get_rng_state(), "cuda": _cuda_rng()}, tmp / f"rng-rank{rank}.pt")
    if world > 1:
        sync()
    if rank == 0:
        save_file(_contiguous(weights), str(tmp / "weights.safetensors"))
        if loop.best is not None:
            save_file(_contiguous(loop.best), str(tmp / "best.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "state.pt")
        state = {
            "step": loop.step,
            "curve": loop.curve,
            "val_curve": loop.val_curve,
            "best_accuracy": loop.best_accuracy,
            "best_step": loop.best_step,
            "since_best": loop.since_best,
            "running": loop.running,
            "tokens": loop.tokens,
            "seconds": loop.seconds,
            "world": world,
            "rng": _rng_state(),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        final = folder / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        sync()
    return folder / name


def _cuda_rng() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    world: int = 1,
) -> LoopState:
    """Restore a checkpoint into the model, optimizer and scheduler and return the loop's state. Every file is read
    and checked before anything is changed: a ValueError/OSError leaves the model and optimizer as they were."""
    state = json.loads((path / "state.json").read_text())
    if state.get("world", 1) != world:
        raise ValueError(f"{path} was written by {state.get('world')} processes; this run has {world}")
    device = next(model.parameters()).device
    weights = load_file(str(path / "weights.safetensors"), device=str(device))
    current = model.state_dict()
    params = dict(model.named_parameters())
    # Parameters must match; buffers may not yet (QAT observers and fake-quant scales take their per-channel shape
    # when they first see data, and their modules resize them when loaded).
    wrong = [k for k, v in weights.items() if k not in current or (k in params and params[k].shape != v.shape)]
    if wrong:
        raise ValueError(f"{path} holds weights this model lacks or shapes it does not have: {wrong[:5]}")
    saved = torch.load(path / "state.pt", map_location=device, weights_only=True)
    rng = torch.load(path / f"rng-rank{rank}.pt", weights_only=True)
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    _set_rng_state(state["rng"])
    return LoopState(
        step=state["step"],
        curve=state["curve"],
        val_curve=state["val_curve"],
        best_accuracy=state["best_accuracy"],
        best_step=state["best_step"],
        best=best,
        since_best=state["since_best"],
        running=state["running"],
        tokens=state["tokens"],
        seconds=state["seconds"],
    )
