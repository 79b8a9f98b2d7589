"""QLoRA: the base weights frozen in 4-bit (bitsandbytes nf4), LoRA adapters trained on top in higher precision.

For export the adapters are merged into full-precision weights. The base weights used for that are the 4-bit
weights dequantized, not the original fp32 ones: the merged model then computes what was trained."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

from toolchain.finetune.lora import lora_config
from toolchain.finetune.train import train_device
from toolchain.models import load_classifier
from toolchain.recipe.schema import FinetuneSection

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def load(src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool) -> torch.nn.Module:
    assert cfg.lora is not None and cfg.qlora is not None
    q = cfg.qlora
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        # The task head and pooler are new or small: they train in full precision (modules_to_save).
        llm_int8_skip_modules=list(cfg.lora.modules_to_save),
    )
    device = train_device()
    model = AutoModelForSequenceClassification.from_pretrained(
        src,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        quantization_config=bnb,
        device_map={"": str(device)},
        **{"use_safetensors": True, "trust_remote_code": False, **trust},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel at the first no-grad forward on the
            # CPU (our validation passes); the repack fails for layers narrower than its 32x64 tiles. Keep the
            # portable layout: validation is a little slower, training is unchanged.
            module.support_avx512bf16_for_cpu = False
    return get_peft_model(model, lora_config(model, cfg))


def finalize(
    model: torch.nn.Module, src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool
) -> torch.nn.Module:
    """A plain fp32 model: dequantized 4-bit base + trained adapters and head, merged."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    plain = load_classifier(src, labels, **trust)
    plain_modules = dict(plain.named_modules())
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            target = plain_modules[name.removesuffix(".base_layer")]
            data, state = module.weight.data, module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                # bitsandbytes' CPU kernel repacks the 4-bit weight at its first forward; dequantize_4bit reads
                # only the original layout, and this (private) inverse is how bitsandbytes itself undoes it.
                data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
            weight = bnbf.dequantize_4bit(data, state)
            target.weight.data.copy_(weight.to(torch.float32).cpu())
    peft_plain = get_peft_model(plain, lora_config(plain, cfg))
    state = {k: v.detach().to(torch.float32).cpu() for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(peft_plain, state)
    return peft_plain.merge_and_unload()
