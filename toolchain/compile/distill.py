"""Distillation: a student with a subset of the fine-tuned teacher's layers, trained to match the teacher.

Two stages:
- `teacher-logits` runs the teacher once over the training rows and keeps its logits (cached like any artifact,
  so changing the student's settings does not rerun the teacher); planned only for logit-only distillation;
- `distill` builds the student (teacher weights, layers `distill.layers` kept), trains it with the one training loop
  on   alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels)
  plus, when asked, the MSE between each student layer's output and its teacher layer's (`hidden_weight`) and the
  KL between their attention maps (`attention_weight`); those two need the teacher's activations, so the teacher
  then runs beside the student on every batch (and its logits there are the soft targets: no teacher-logits stage).
  `intermediate_size` also prunes each student layer's FFN (`toolchain.compile.prune`) before training.
  The student is saved as a plain transformers model and flows through export, optimization and quantization like
  the teacher would.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.errors import StageError
from toolchain.finetune.train import pad_batch
from toolchain.recipe.schema import DistillSection, FinetuneSection, TrainingSettings, ValidationSection

log = logging.getLogger("toolchain")

TEACHER_LOGITS = "teacher_logits.npy"


def layer_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList holding the transformer blocks (encoder.layer for BERT, transformer.layer for DistilBERT...)."""
    n = model.config.num_hidden_layers
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.rsplit(".", 1)[-1] in ("layer", "layers")
    ]
    if len(found) != 1:
        raise StageError(
            "distill",
            f"cannot find the list of {n} transformer layers in {type(model).__name__} "
            f"(candidates: {[name for name, _ in found]}); this architecture is not supported by compile.distill",
        )
    return found[0]


def build_student(teacher: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A copy of the teacher with only the layers `keep` (in that order); config.num_hidden_layers follows."""
    n = teacher.config.num_hidden_layers
    bad = [i for i in keep if i >= n]
    if bad:
        raise StageError("distill", f"compile.distill.layers {keep}: the teacher has layers 0..{n - 1} only")
    student = copy.deepcopy(teacher).requires_grad_(True)  # trainable even when the teacher was frozen
    name, layers = layer_list(student)
    parent = student.get_submodule(name.rsplit(".", 1)[0]) if "." in name else student
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList([layers[i] for i in keep]))
    student.config.num_hidden_layers = len(keep)
    for i, block in enumerate(getattr(parent, name.rsplit(".", 1)[-1])):
        attn = getattr(block, "attention", None)
        inner = getattr(attn, "self", None) if attn is not None else None
        if inner is not None and hasattr(inner, "layer_idx"):
            inner.layer_idx = i
    return student


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at temperature T, scaled by T^2 so gradients keep scale."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, -1),
        F.log_softmax(teacher_logits.float() / t, -1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention rows (B, H, T, T), averaged over heads and real query positions."""
    eps = 1e-12
    kl = (teacher * (torch.log(teacher + eps) - torch.log(student + eps))).sum(-1)  # (B, H, T)
    m = mask[:, None, :].float()
    return (kl * m).sum() / (m.sum() * kl.shape[1]).clamp_min(1)


def make_loss(
    cfg: DistillSection,
    keep: list[int],
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: torch.nn.Module | None,
) -> Any:
    """The student's loss. With hidden-state or attention transfer the teacher runs beside the student on every
    batch and its logits there are the soft targets; otherwise they come from `teacher_logits` (one row per
    training row)."""
    needs_teacher = cfg.hidden_weight > 0 or cfg.attention_weight > 0
    if (teacher_logits is None) != needs_teacher or (teacher is None) == needs_teacher:
        raise ValueError("make_loss: the teacher runs online exactly when hidden or attention transfer is on")

    def loss_fn(student: torch.nn.Module, batch: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        out = student(**batch, output_hidden_states=cfg.hidden_weight > 0, output_attentions=cfg.attention_weight > 0)
        device = out.logits.device
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(
                    **batch, output_hidden_states=cfg.hidden_weight > 0, output_attentions=cfg.attention_weight > 0
                )
            t_logits = t_out.logits
        else:
            assert teacher_logits is not None
            t_logits = teacher_logits[rows].to(device)
        loss = cfg.alpha * kd_loss(out.logits, t_logits, cfg.temperature)
        if cfg.alpha < 1:
            loss = loss + (1 - cfg.alpha) * F.cross_entropy(out.logits.float(), labels[rows].to(device))
        if teacher is not None:
            mask = batch["attention_mask"]
            for i, t_layer in enumerate(keep):
                if cfg.hidden_weight > 0:
                    m = mask[..., None].float()
                    diff = (out.hidden_states[i + 1].float() - t_out.hidden_states[t_layer + 1].float()) ** 2
                    loss = loss + cfg.hidden_weight * (diff * m).sum() / (m.sum() * diff.shape[-1])
                if cfg.attention_weight > 0:
                    loss = loss + cfg.attention_weight * attention_kl(
                        out.attentions[i].float(), t_out.attentions[t_layer].float(), mask
                    )
        return loss

    return loss_fn


def student_training_cfg(cfg: DistillSection, validation: ValidationSection | None) -> FinetuneSection:
    """The training loop's settings for the student (validation as the recipe's fine-tuning has it)."""
    shared = cfg.model_dump(include=set(TrainingSettings.model_fields))
    return FinetuneSection(method="full", validation=validation, **shared)


def load_classifier_model(folder: Path, eager: bool = False) -> Any:
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"use_safetensors": True}
    if eager:  # attention maps are only returned by the eager attention implementation
        kwargs["attn_implementation"] = "eager"
    return AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)


def teacher_logits(model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
    """The teacher's fp32 logits (rows, labels), rows batched by length."""
    from tqdm.auto import tqdm

    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), 128), desc="teacher-logits", unit="batch", mininterval=2.0):
            idx = order[start : start + 128]
            batch = pad_batch([ids[i] for i in idx], tokenizer.pad_token_id or 0)
            out[idx] = model(**batch).logits.float().numpy()
    return out
