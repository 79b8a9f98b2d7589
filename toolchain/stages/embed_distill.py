"""The `embed-distill` stage. Distil the fine-tuned embedder into a student that keeps some of its layers, trained to
give each training text (both sides of every training pair) the teacher's embedding.

Helpers: `toolchain.embed.distill`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from toolchain import model_inputs
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.embed.distill import distill_embeddings, student_of
from toolchain.embed.model import load_embedder, pooling_settings, save_embedder
from toolchain.models import copy_tokenizer
from toolchain.recipe.schema import DistillSection
from toolchain.runtime import TextEncoder

log = logging.getLogger("toolchain")


class EmbedDistillConfig(DistillSection):
    """The recipe's `compile.distill` section (the student's layers and training settings)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


@register(
    "embed-distill",
    kind="hf-model",
    help="Distil the embedder into a student with some of its layers (MSE to the teacher's embeddings).",
    version=2,  # 2: fused AdamW
    config=EmbedDistillConfig,
)
def embed_distill(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import torch

    cfg = ctx.config(EmbedDistillConfig)
    src = inputs["finetune"].path
    teacher = load_embedder(src)
    keep = cfg.kept_layers(teacher.config.num_hidden_layers)
    torch.manual_seed(cfg.seed)
    student = student_of(teacher, keep)
    train = ctx.train
    texts = list(dict.fromkeys(train.texts + (train.pairs or [])))  # each training text once
    log.info("distill: student keeps teacher layers %s; %d training texts", keep, len(texts))
    encoder = TextEncoder(src / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD)
    stats = distill_embeddings(teacher, student, encoder, texts, cfg.model_dump(mode="json"))
    save_embedder(student.float(), out, pooling_settings(src)["pooling"])
    copy_tokenizer(src, out)
    (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    params = sum(p.numel() for p in student.parameters())
    return {"kept_layers": keep, "texts": len(texts), "parameters": params, **stats}
