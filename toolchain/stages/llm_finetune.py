"""The `llm-finetune` stage. LoRA (or full) tuning on prompt + label word, the loss on the answer tokens; adapters
merged.

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import register
from toolchain.data import Split
from toolchain.finetune.train import seed_everything, train_classifier
from toolchain.llm.helpers import PromptConfig, load_tokenizer, prompt_task, save_model
from toolchain.llm.task import answer_loss, training_texts
from toolchain.recipe.schema import FinetuneSection

log = logging.getLogger("toolchain")


class LlmFinetuneConfig(FinetuneSection, PromptConfig):
    """The recipe's `finetune` section and the prompt the answers are trained after."""

    model_config = ConfigDict(extra="ignore", frozen=True)


@register(
    "llm-finetune",
    kind="hf-model",
    help="LoRA (or full) tuning on prompt + label word, the loss on the answer tokens; adapters merged.",
    version=2,  # 2: fused AdamW
    config=LlmFinetuneConfig,
)
def llm_finetune(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = ctx.config(LlmFinetuneConfig)
    seed_everything(cfg.seed)
    base = inputs["llm-base"].path
    tokenizer = load_tokenizer(base)
    tokenizer.truncation_side = "left"  # a long text loses its start, never the answer the loss is on
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    task = prompt_task(cfg)
    train = ctx.train
    texts, answer_tokens = training_texts(task, tokenizer, train.texts, train.labels)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    cut = sum(n > cfg.max_length for n in lengths)
    if cut:
        log.info(
            "llm-finetune: %d of %d training prompts are longer than %d tokens; their start is cut",
            cut,
            len(texts),
            cfg.max_length,
        )
    trained: Any = model
    if cfg.method == "lora":
        assert cfg.lora is not None
        trained = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
            ),
        )
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    log.info(
        "llm-finetune: %s on %d rows, %d of %d parameters trainable",
        cfg.method,
        len(texts),
        trainable,
        sum(p.numel() for p in trained.parameters()),
    )
    stats = train_classifier(
        trained,
        tokenizer,
        Split(train.path, texts, train.labels, train.sha256),
        cfg,
        loss_fn=answer_loss(answer_tokens),
        distributed=False,
        desc="llm-finetune",
        checkpoints=ctx.checkpoint_dir,
    )
    merged = trained.merge_and_unload() if cfg.method == "lora" else trained
    merged = merged.to("cpu").eval()
    tokenizer.truncation_side = "right"
    save_model(merged, tokenizer, out)
    (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    return {
        "method": cfg.method,
        "trainable_parameters": trainable,
        "rows": len(texts),
        "prompts_cut": cut,
        **{k: v for k, v in stats.items() if k not in ("loss_curve", "validation_curve")},
    }
