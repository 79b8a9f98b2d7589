"""The `tag-finetune` stage. Fine-tune the source encoder with a token-classification head on tagged words (each
word's tag at its first sub-token).

Helpers: `toolchain.tag.train`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict
from transformers import AutoModelForTokenClassification

from toolchain import model_inputs
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.models import copy_tokenizer, resolve_source, trust_kwargs
from toolchain.recipe.schema import FinetuneSection, ModelSection
from toolchain.runtime import TextEncoder
from toolchain.tag.train import train_tagger

log = logging.getLogger("toolchain")


class TagFinetuneConfig(FinetuneSection):
    """The recipe's `finetune` section, the tag set and the source model (identity hashed; `access` says where it is
    and what loading it may do)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    labels: list[str]
    model: dict[str, str]
    access: ModelSection


@register(
    "tag-finetune",
    kind="hf-model",
    help="Fine-tune the source encoder with a token-classification head on tagged words.",
    version=2,  # 2: fused AdamW
    config=TagFinetuneConfig,
)
def tag_finetune(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(TagFinetuneConfig)
    src = resolve_source(cfg.model["source"], cfg.access)
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    model = AutoModelForTokenClassification.from_pretrained(
        src,
        num_labels=len(cfg.labels),
        id2label=dict(enumerate(cfg.labels)),
        label2id={t: i for i, t in enumerate(cfg.labels)},
        **trust_kwargs(src, cfg.access),
    )
    copy_tokenizer(src, out)
    if not (out / "tokenizer.json").is_file():
        raise StageError("tag-finetune", f"{src} has no tokenizer.json; add one (tokenizers library) to the folder")
    train = ctx.train
    log.info("finetune: %d tagged sentences, %d tags", len(train), len(cfg.labels))
    encoder = TextEncoder(out / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD)
    stats = train_tagger(model, encoder, train, cfg.model_dump(mode="json"))
    model.save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    return {"method": cfg.method, "parameters": sum(p.numel() for p in model.parameters()), **stats}
