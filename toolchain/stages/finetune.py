"""The `finetune` stage. Fine-tune the source model on the train split (full, lora, qlora, qat).

Helpers: `toolchain.finetune.methods`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
from pydantic import ConfigDict
from safetensors.torch import save_file
from transformers import AutoTokenizer

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.finetune.methods import AGREEMENT_ROWS, METHODS, QAT_STATE, apply_freeze, rank_predictions
from toolchain.finetune.train import seed_everything, train_classifier
from toolchain.models import copy_tokenizer, resolve_source, trust_kwargs
from toolchain.recipe.schema import FinetuneSection, ModelSection


class FinetuneConfig(FinetuneSection):
    """The recipe's `finetune` section, the label names and the source model (its identity is hashed; `access` says
    where it is and what loading it may do)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    labels: list[str]
    model: dict[str, str]
    access: ModelSection


log = logging.getLogger("toolchain")


@register(
    "finetune",
    kind="hf-model",
    help="Fine-tune the source model on the train split (full, lora, qlora, qat).",
    version=3,  # 2: QAT keeps Linear outputs in float; 3: fused AdamW
    config=FinetuneConfig,
)
def finetune(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(FinetuneConfig)
    labels = cfg.labels
    src = resolve_source(cfg.model["source"], cfg.access)
    trust = trust_kwargs(src, cfg.access)
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust["trust_remote_code"])
    method = METHODS[cfg.method]
    model = method.load(src, labels, cfg, **trust)
    frozen = apply_freeze(model, cfg.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("finetune: %s on %d rows, %d of %d parameters trainable", cfg.method, len(ctx.train), trainable, total)
    hook = method.on_step(cfg) if hasattr(method, "on_step") else None
    stats = train_classifier(
        model,
        tokenizer,
        ctx.train,
        cfg,
        ctx.validation if cfg.validation else None,
        on_step=hook,
        checkpoints=ctx.checkpoint_dir,
    )
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    if cfg.method == "qat" and main_rank:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out / QAT_STATE))
    model = method.finalize(model, src, labels, cfg, **trust).to("cpu").float()
    views = rank_predictions(model, tokenizer, ctx.train.texts[:AGREEMENT_ROWS])
    if main_rank:
        model.save_pretrained(out, safe_serialization=True)
        copy_tokenizer(src, out)
        if not (out / "tokenizer.json").is_file():  # a folder with vocab.txt/sentencepiece files only: convert it
            if not getattr(tokenizer, "is_fast", False):
                raise StageError(
                    "finetune",
                    f"{src} has no tokenizer.json and transformers could not convert its tokenizer to one; "
                    "add a tokenizer.json (tokenizers library) to the model folder",
                )
            tokenizer.save_pretrained(out)
            log.info("finetune: %s has no tokenizer.json; wrote the one transformers converted", src)
        (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    meta = {
        "method": cfg.method,
        "trainable_parameters": trainable,
        "parameters": total,
        "frozen_parameters": frozen,
        **{k: v for k, v in stats.items() if k not in ("loss_curve", "validation_curve")},
    }
    if views is not None:
        meta["rank_predictions"] = views
        meta["ranks_agree"] = all(v == views[0] for v in views)
    return meta
