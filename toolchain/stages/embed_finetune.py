"""The `embed-finetune` stage. The embedder to compress: the source encoder with mean pooling and L2 normalization,
fine-tuned on the train pairs with the cosine-similarity loss (finetune.method full) or as it is (none).

Helpers: `toolchain.embed`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict
from transformers import AutoModel

from toolchain import model_inputs
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.embed.model import Pooled, save_embedder
from toolchain.embed.train import train_on_pairs
from toolchain.errors import StageError
from toolchain.models import copy_tokenizer, resolve_source, trust_kwargs
from toolchain.recipe.schema import EmbeddingSection, FinetuneSection, ModelSection
from toolchain.runtime import TextEncoder

log = logging.getLogger("toolchain")


class EmbedFinetuneConfig(FinetuneSection):
    """The recipe's `finetune` section, its `embedding` section and the source model (identity hashed, `access`
    says where it is and what loading it may do)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    embedding: EmbeddingSection
    model: dict[str, str]
    access: ModelSection


@register(
    "embed-finetune",
    kind="hf-model",
    help="The embedder: the source encoder with mean pooling and normalization, fine-tuned on scored pairs with the "
    "cosine-similarity loss (method full) or as it is (method none).",
    version=2,  # 2: fused AdamW
    config=EmbedFinetuneConfig,
)
def embed_finetune(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(EmbedFinetuneConfig)
    src = resolve_source(cfg.model["source"], cfg.access)
    torch.manual_seed(cfg.seed)  # weights the checkpoint lacks (an unused pooler) start the same on every run
    encoder = AutoModel.from_pretrained(src, **trust_kwargs(src, cfg.access))
    model = Pooled(encoder, normalize=cfg.embedding.normalize)
    copy_tokenizer(src, out)
    if not (out / "tokenizer.json").is_file():
        raise StageError("embed-finetune", f"{src} has no tokenizer.json; add one (tokenizers library) to the folder")
    meta: dict[str, Any] = {"method": cfg.method, "parameters": sum(p.numel() for p in model.parameters())}
    if cfg.method == "full":
        train = ctx.train
        log.info("finetune: cosine-similarity loss on %d scored pairs", len(train))
        encoder_fields = TextEncoder(out / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD)
        stats = train_on_pairs(model, encoder_fields, train, cfg.model_dump(mode="json"), cfg.embedding.score_max)
        (out / "train_log.json").write_text(json.dumps(stats, indent=2))
        meta |= stats | {"train_pairs": len(train)}
    else:
        log.info("finetune: method none: the pretrained encoder as it is, with %s pooling", cfg.embedding.pooling)
    save_embedder(model.float(), out, cfg.embedding.pooling)
    return meta
