"""The `llm-bundle` stage. The chosen decoder with its tokenizer, generation settings and manifest
(toolchain.runtime.Generator).

Helpers: `toolchain.llm.helpers`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from toolchain.bundle_files import io_spec
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.manifest import file_table, lineage, target, write_manifest
from toolchain.core.registry import register
from toolchain.errors import StageError
from toolchain.llm.fused import is_fused
from toolchain.llm.helpers import PromptConfig, context_length, load_tokenizer, prompt_task, stop_token_ids
from toolchain.runtime import CPU_SESSION_CONFIG, GENERATOR_MANIFEST_VERSION

KV_OPTIMUM = (
    "past_key_values.N.key/value in (batch, kv_heads, past, head_dim), present.N.* out; the first run takes the "
    "prompt and empty past tensors, each later run one token and the previous run's present"
)
KV_FUSED = (
    "GroupQueryAttention: past_key_values.N.key/value in (batch, kv_heads, past or capacity, head_dim), present.N.* "
    "out; seqlens_k = tokens in the cache after the run - 1, total_sequence_length = the same + 1; the first run "
    "takes the prompt and empty past tensors (or the cache of a prefix), each later run one token; bind each "
    "layer's past and present to one buffer of `capacity` positions and the run writes in place (no copy); "
    "logits (batch, 1, vocab) of the last position; no padding inside a prompt"
)


class LlmBundleConfig(PromptConfig):
    shipped: str  # the chosen variant
    name: str  # the recipe's
    eval_file: str
    max_new_tokens: int
    budget: dict[str, Any]
    base_model: dict[str, str]  # the source model's identity (hashed)


@register(
    "llm-bundle",
    kind="bundle",
    help="The chosen decoder with its tokenizer, generation settings and manifest (toolchain.runtime.Generator).",
    # 2: generation.json records the model's context length; 3: the manifest names the runtime; 4: tokenizer_config.json
    # (the Node app's tokenizer reads it) and the fused graph's KV-cache contract
    version=4,
    config=LlmBundleConfig,
)
def llm_bundle(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    g = ctx.config(LlmBundleConfig)
    shipped = g.shipped
    source = next(k for k in call.inputs if k.startswith(("llm-export", "llm-quantize.")))
    shutil.copy2(inputs[source].file("model.onnx"), out / "model.onnx")
    tok_dir = inputs["llm-finetune"].path
    shutil.copy2(tok_dir / "tokenizer.json", out / "tokenizer.json")
    if (tok_dir / "tokenizer_config.json").is_file():  # the Node app's tokenizer reads it beside tokenizer.json
        shutil.copy2(tok_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    tokenizer = load_tokenizer(tok_dir)
    task = prompt_task(g, g.max_new_tokens)
    prefix, suffix = task.affixes(tokenizer)
    for text in ctx.eval.texts[:50]:  # the app's prompt must be the one evaluated, byte for byte
        if prefix + g.template.format(text=text) + suffix != task.prompt(tokenizer, text):
            raise StageError("bundle", f"the chat template cannot be split around the prompt for eval text {text!r}")
    metrics = json.loads(inputs[f"llm-evaluate.{shipped}"].file("metrics.json").read_text())
    generation = {
        "template": g.template,
        "prompt_prefix": prefix,
        "prompt_suffix": suffix,
        "labels": g.labels,
        "max_new_tokens": g.max_new_tokens,
        "stop_strings": list(g.stop_strings),
        "stop_token_ids": stop_token_ids(tokenizer),
        # what the accuracy was measured with: the prompts' shared first tokens (their key/values computed once;
        # a prompt that does not start with them is run whole) and the batch size of Generator.classify_batch
        "prefix_ids": metrics["prefix_ids"],
        "batch_size": metrics["batch_size"],
        # prompt + answer tokens the model takes; Generator.classify cuts a longer text to its first tokens
        "context_length": context_length(tok_dir),
        "parse": "the label whose word comes first in the answer, whole words, case ignored; none: unparsed",
    }
    (out / "generation.json").write_text(json.dumps(generation, indent=2))
    bench = json.loads(inputs["llm-bench"].file("bench.json").read_text())
    timing = bench["variants"][shipped]
    files = file_table(out)
    manifest = {
        "format_version": GENERATOR_MANIFEST_VERSION,
        "kind": "generator",
        "name": g.name,
        "variant": shipped,
        "model": "model.onnx",
        "runtime": {"name": "onnxruntime", "cpu_session_config": dict(CPU_SESSION_CONFIG)},
        "tokenizer": "tokenizer.json",
        "generation": "generation.json",
        **io_spec(out / "model.onnx"),
        "kv_cache": KV_FUSED if is_fused(out / "model.onnx") else KV_OPTIMUM,
        "metrics": {
            "accuracy": metrics["accuracy"],
            "eval_rows": metrics["eval_rows"],
            "eval_file": g.eval_file,
            "ttft_ms_p50": timing["ttft_ms"]["p50"],
            "decode_tokens_per_second": timing["decode_tokens_per_second"],
            "peak_rss_bytes": timing["peak_rss_bytes"],
            "size_bytes": files["model.onnx"]["bytes"],
        },
        "target": target(bench["threads"], g.budget),
        "lineage": lineage(ctx, call, g.base_model),
        "files": files,
        "bundle_bytes": sum(f["bytes"] for f in files.values()),
    }
    write_manifest(out, manifest)
    return {"shipped": shipped, "files": sorted(files), "bundle_bytes": manifest["bundle_bytes"]}
