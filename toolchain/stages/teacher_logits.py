"""The `teacher-logits` stage. Run the fine-tuned teacher once over the training rows and keep its logits for
distillation.

Helpers: `toolchain.compile.distill`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.compile.distill import TEACHER_LOGITS, load_classifier_model, teacher_logits
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register

log = logging.getLogger("toolchain")


class TeacherLogitsConfig(StageConfig):
    max_length: int  # tokens per training row, as the student sees them


@register(
    "teacher-logits",
    kind="arrays",
    help="Run the fine-tuned teacher once over the training rows and keep its logits for distillation.",
    config=TeacherLogitsConfig,
)
def teacher_logits_stage(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    teacher_dir = inputs["finetune"].path
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    max_length = ctx.config(TeacherLogitsConfig).max_length
    logits = teacher_logits(load_classifier_model(teacher_dir), tokenizer, ctx.train.texts, max_length)
    np.save(out / TEACHER_LOGITS, logits)
    agree = float((logits.argmax(-1) == ctx.train.labels).mean())
    log.info("teacher-logits: %d training rows, teacher agrees with the labels on %.4f", len(logits), agree)
    return {"rows": len(logits), "teacher_train_accuracy": agree}
