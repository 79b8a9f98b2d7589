"""The `distill` stage. Distil the fine-tuned teacher into a student with fewer layers (logit, hidden-state, attention
losses).

Helpers: `toolchain.compile.distill`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict

from toolchain.compile.distill import (
    TEACHER_LOGITS,
    build_student,
    layer_list,
    load_classifier_model,
    make_loss,
    student_training_cfg,
)
from toolchain.compile.prune import ffn_importance, prune_ffn
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.finetune.train import seed_everything, train_classifier
from toolchain.models import copy_tokenizer
from toolchain.recipe.schema import DistillSection, ValidationSection

log = logging.getLogger("toolchain")

PRUNING_ROWS = 2048  # training rows whose FFN activations rank the neurons (intermediate_size)


class DistillConfig(DistillSection):
    """The recipe's `compile.distill` section and the fine-tuning's validation settings (the student is validated
    like the teacher)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    validation: ValidationSection | None = None


@register(
    "distill",
    kind="hf-model",
    help="Distil the fine-tuned teacher into a student with fewer layers and, optionally, narrower FFNs (logit, "
    "hidden-state, attention losses).",
    # 2: with hidden/attention transfer, soft targets from the teacher running beside the student; 3: fused AdamW
    version=3,
    config=DistillConfig,
)
def distill(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    cfg = ctx.config(DistillConfig)
    teacher_dir = inputs["finetune"].path
    online = cfg.hidden_weight > 0 or cfg.attention_weight > 0  # the teacher runs beside the student
    logits = None
    if not online:  # soft targets from the teacher's cached logits
        logits = torch.from_numpy(np.load(inputs["teacher-logits"].file(TEACHER_LOGITS)))
        if len(logits) != len(ctx.train):
            raise StageError("distill", f"{len(logits)} cached teacher logits for {len(ctx.train)} training rows")
    seed_everything(cfg.seed)
    eager = cfg.attention_weight > 0
    teacher = load_classifier_model(teacher_dir, eager=eager)
    teacher_layers = teacher.config.num_hidden_layers
    keep = cfg.kept_layers(teacher_layers)
    student: Any = build_student(teacher, keep)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if cfg.intermediate_size is not None:
        _, blocks = layer_list(student)
        scores = ffn_importance(student, blocks, tokenizer, ctx.train.texts[:PRUNING_ROWS], cfg.max_length)
        prune_ffn(student, blocks, cfg.intermediate_size, scores)
    params = (sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters()))
    log.info(
        "distill: student keeps teacher layers %s of %d (%.1fM of %.1fM parameters)",
        keep,
        teacher_layers,
        params[1] / 1e6,
        params[0] / 1e6,
    )
    if online:
        teacher.eval().requires_grad_(False)
    else:
        del teacher
    loss_fn = make_loss(
        cfg,
        keep,
        logits,
        torch.as_tensor(ctx.train.labels),
        teacher if online else None,
    )
    stats = train_classifier(
        student,
        tokenizer,
        ctx.train,
        student_training_cfg(cfg, cfg.validation),
        ctx.validation if cfg.validation else None,
        loss_fn=loss_fn,
        distributed=False,  # under torchrun only fine-tuning is shared; the other ranks stop after it
        desc="distill",
        checkpoints=ctx.checkpoint_dir,
    )
    student = student.to("cpu").float()
    student.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(teacher_dir, out)
    (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    return {
        "method": "distill",
        "kept_layers": keep,
        "teacher_layers": teacher_layers,
        "intermediate_size": cfg.intermediate_size,
        "parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": params[0],
        **{k: v for k, v in stats.items() if k not in ("loss_curve", "validation_curve")},
    }
