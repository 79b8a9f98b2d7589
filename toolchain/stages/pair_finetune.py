"""The `pair-finetune` stage. Fine-tune the source encoder as a cross-encoder on (text, text_pair) rows: a sequence
classifier over the labels, or a regressor of the score (one output).

Helpers: `toolchain.pair.train`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict
from transformers import AutoModelForSequenceClassification

from toolchain import model_inputs
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.models import copy_tokenizer, resolve_source, trust_kwargs
from toolchain.pair.train import train_cross_encoder
from toolchain.recipe.schema import FinetuneSection, ModelSection, PairsSection
from toolchain.runtime import TextEncoder

log = logging.getLogger("toolchain")

SCORE = "score"  # the one output's name in a regressor's config (id2label)


class PairFinetuneConfig(FinetuneSection):
    """The recipe's `finetune` and `pairs` sections, the labels and the source model (identity hashed; `access` says
    where it is and what loading it may do)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    pairs: PairsSection
    labels: list[str]
    model: dict[str, str]
    access: ModelSection


@register(
    "pair-finetune",
    kind="hf-model",
    help="Fine-tune the source encoder as a cross-encoder on (text, text_pair) rows: classification or regression.",
    version=2,  # 2: fused AdamW
    config=PairFinetuneConfig,
)
def pair_finetune(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(PairFinetuneConfig)
    regression = cfg.pairs.objective == "regression"
    names = [SCORE] if regression else cfg.labels
    src = resolve_source(cfg.model["source"], cfg.access)
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(
        src,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        problem_type="regression" if regression else "single_label_classification",
        **trust_kwargs(src, cfg.access),
    )
    copy_tokenizer(src, out)
    if not (out / "tokenizer.json").is_file():
        raise StageError("pair-finetune", f"{src} has no tokenizer.json; add one (tokenizers library) to the folder")
    train = ctx.train
    log.info("finetune: cross-encoder (%s) on %d pairs", cfg.pairs.objective, len(train))
    encoder = TextEncoder(out / "tokenizer.json", cfg.max_length, fields=model_inputs.ENCODING_FIELD)
    stats = train_cross_encoder(model, encoder, train, cfg.model_dump(mode="json"), regression, cfg.pairs.score_max)
    model.save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    return {"method": cfg.method, "objective": cfg.pairs.objective, "train_pairs": len(train), **stats}
