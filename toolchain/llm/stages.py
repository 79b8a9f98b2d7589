"""The generation pipeline's stages: the base decoder as a transformers folder, LoRA tuning on prompt + label word,
ONNX export with the KV cache (parity over decode steps), weight-only int4/int8, accuracy by greedy generation with
an agreement check on a fixed prompt set, and time to first token / decode tokens per second in fresh processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import StageError
from toolchain.pipeline import Artifact, RunContext, StageCall
from toolchain.registry import register
from toolchain.runlog import child_failed

log = logging.getLogger("toolchain")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def prompt_task(ctx: RunContext) -> Any:
    from toolchain.llm.task import PromptTask

    g = ctx.recipe.generation
    assert g is not None
    return PromptTask(ctx.recipe.data.labels, g.template, g.chat, g.max_new_tokens, list(g.stop_strings))


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end an answer: the chat template's end of turn and the tokenizer's eos."""
    from toolchain.llm.task import end_of_turn

    ids = {tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def _save_model(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@register("llm-base", kind="hf-model", help="The base decoder (GGUF dequantized, or a folder) saved as fp32.")
def llm_base(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from toolchain.llm.export import load_causal_lm
    from toolchain.models import gguf_file, resolve_source

    folder = resolve_source(ctx.recipe.model.source, ctx.recipe.model)
    gguf = gguf_file(folder)
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(folder, gguf)
    seconds = time.perf_counter() - t0
    _save_model(model, tokenizer, out)
    return {
        "source_file": gguf or str(folder),
        "load_seconds": round(seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "stop_token_ids": stop_token_ids(tokenizer),
    }


@register(
    "llm-finetune",
    kind="hf-model",
    help="LoRA (or full) tuning on prompt + label word, the loss on the answer tokens; adapters merged.",
)
def llm_finetune(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from toolchain.data import Split
    from toolchain.finetune.train import seed_everything, train_classifier
    from toolchain.llm.task import answer_loss, training_texts

    cfg = ctx.recipe.finetune
    seed_everything(cfg.seed)
    base = inputs["llm-base"].path
    tokenizer = load_tokenizer(base)
    tokenizer.truncation_side = "left"  # a long text loses its start, never the answer the loss is on
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    task = prompt_task(ctx)
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
    trained = model
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
    _save_model(merged, tokenizer, out)
    (out / "train_log.json").write_text(json.dumps(stats, indent=2))
    return {
        "method": cfg.method,
        "trainable_parameters": trainable,
        "rows": len(texts),
        "prompts_cut": cut,
        **{k: v for k, v in stats.items() if k not in ("loss_curve", "validation_curve")},
    }


@register(
    "llm-export", kind="onnx", help="ONNX with past key/values (optimum); parity over the prompt and decode steps."
)
def llm_export(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from toolchain.llm.export import decode_parity, export_with_past

    src = inputs["llm-finetune"].path
    onnx_path = export_with_past(src, out, opset=call.config["opset"])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(src)
    task = prompt_task(ctx)
    prompt_ids = tokenizer(task.prompt(tokenizer, ctx.eval.texts[0]), add_special_tokens=False)["input_ids"]
    parity = decode_parity(model, onnx_path, prompt_ids, steps=call.config["parity_steps"])
    log.info(
        "llm-export: parity over the prompt (%d tokens) and %d decode steps: max |diff| %.2e (tolerance %.0e), "
        "greedy tokens agree: %s",
        len(prompt_ids),
        parity["steps"],
        parity["max_abs_diff"],
        call.config["atol"],
        parity["greedy_agree"],
    )
    if parity["max_abs_diff"] > call.config["atol"] or not parity["greedy_agree"]:
        raise StageError(
            "llm-export",
            f"ONNX logits differ from PyTorch by {parity['max_abs_diff']:.2e} (compile.export.atol "
            f"{call.config['atol']:.0e}) or the greedy tokens differ ({parity['greedy_agree']}) over "
            f"{parity['steps']} decode steps",
        )
    return {"parity": parity, "size_bytes": onnx_path.stat().st_size, "prompt_tokens": len(prompt_ids)}


@register("llm-quantize", kind="onnx", help="Weight-only MatMulNBits (4 or 8 bits, blocks) of the decoder's MatMuls.")
def llm_quantize(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    import onnx

    from toolchain.compile.quantize import matmul_nbits

    c = call.config
    src = inputs["llm-export"].file("model.onnx")
    exclude = list(c.get("exclude") or [])
    args = (c["block_size"], c["symmetric"], c["accuracy_level"])
    eight: list[str] = []
    if c.get("int8_nodes"):  # mixed precision: the named MatMuls to 8 bits first, the rest to c["bits"]
        names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
        eight = [n for n in names if any(p in n for p in c["int8_nodes"]) and n not in exclude]
        if not eight:
            raise StageError("llm-quantize", f"int8_nodes {c['int8_nodes']} match no MatMul of the exported graph")
        matmul_nbits(src, out / "mixed.onnx", *args, only=eight, bits=8)
        src = out / "mixed.onnx"
    matmul_nbits(src, out / "model.onnx", *args, None, exclude, bits=c["bits"])
    (out / "mixed.onnx").unlink(missing_ok=True)
    ranking = None
    if c.get("sensitivity"):
        ranking = rank_projections(ctx, inputs, c, out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    return {
        "bits": c["bits"],
        "matmulnbits_nodes": len(nbits),
        "int8_weight_nodes": nbits.count(8) if c["bits"] != 8 else 0,
        "int8_nodes": eight,
        "float_matmul_nodes": sum(n.op_type == "MatMul" for n in graph.node),
        "excluded": exclude,
        "size_bytes": (out / "model.onnx").stat().st_size,
        **({"sensitivity": ranking} if ranking is not None else {}),
    }


def rank_projections(ctx: RunContext, inputs: dict[str, Artifact], c: dict[str, Any], out: Path) -> list[dict]:
    """How much each projection group costs when it alone is quantized at this variant's bits: each projection
    over all layers (q_proj, v_proj, down_proj, ...), then each layer's projections together. Measured on held-out
    prompts (not the eval split) as the change of the margin between the label words' first tokens after the
    prompt, against the fp32 graph, and how many rows change sides."""
    import re

    import onnx

    from toolchain.compile.quantize import matmul_nbits
    from toolchain.data import read_split
    from toolchain.runtime import DecoderGenerator

    recipe = ctx.recipe
    src = inputs["llm-export"].file("model.onnx")
    tokenizer = load_tokenizer(inputs["llm-finetune"].path)
    task = prompt_task(ctx)
    d = recipe.data
    rows = read_split(recipe.data_root() / c["auto_file"], d.text, d.label, d.labels).head(c["sensitivity_rows"])
    prompts = [tokenizer(task.prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in rows.texts]
    first = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in d.labels[:2]]

    def margins(path: Path) -> np.ndarray:
        gen = DecoderGenerator(path, threads=ctx.threads)
        logits = [gen.step(np.array([p]), gen.empty_past(), len(p))[0] for p in prompts]
        return np.array([x[first[1]] - x[first[0]] for x in logits])

    reference = margins(src)
    names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
    groups: dict[str, list[str]] = {}  # each projection over all layers, then each layer's projections
    for name in names:
        groups.setdefault(re.sub(r"layers\.\d+", "layers.*", name), []).append(name)
    for name in names:
        layer = re.search(r"/layers\.\d+/", name)
        if layer and "_proj/" in name:
            groups.setdefault(f"{layer[0]}*_proj", []).append(name)
    ranking = []
    probe = out / "probe.onnx"
    for group, members in groups.items():
        if len(members) < 2 and "_proj" not in group:  # not a projection (attention's scores have no weight)
            continue
        matmul_nbits(src, probe, c["block_size"], c["symmetric"], c["accuracy_level"], only=members, bits=c["bits"])
        m = margins(probe)
        if np.array_equal(m, reference):  # nothing quantized: MatMuls without a constant weight
            continue
        ranking.append(
            {
                "group": group,
                "nodes": len(members),
                "margin_mse": float(((m - reference) ** 2).mean()),
                "rows_changing_side": int(((m > 0) != (reference > 0)).sum()),
                "rows": len(prompts),
            }
        )
    probe.unlink(missing_ok=True)
    ranking.sort(key=lambda r: -r["margin_mse"])
    worst = ", ".join(f"{r['group']} {r['margin_mse']:.3f}" for r in ranking[:4])
    log.info("llm-quantize: projection sensitivity at %d bits on %d rows: %s", c["bits"], len(prompts), worst)
    return ranking


# ---------------------------------------------------------------------------------------------------------------
# accuracy by generation


@register(
    "llm-evaluate",
    kind="metrics",
    help="Accuracy on the eval split from greedy answers; greedy continuations of the fixed agreement prompts.",
    version=3,  # 3: prompts are encoded whole (the saved tokenizer's training truncation no longer applies)
)
def llm_evaluate(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from toolchain.runtime import DecoderGenerator, common_prefix

    c = call.config
    g = ctx.recipe.generation
    assert g is not None
    task = prompt_task(ctx)
    tok_dir = inputs[c["tokenizer_from"]].path
    tokenizer = load_tokenizer(tok_dir)
    stops = stop_token_ids(tokenizer)
    evl = ctx.eval
    prompts = [task.prompt(tokenizer, t) for t in evl.texts]
    t0 = time.perf_counter()
    if c["format"] == "pytorch":
        from toolchain.llm.torch_decoder import TorchDecoder

        gen: DecoderGenerator = TorchDecoder(
            inputs[c["source"]].path, tok_dir / "tokenizer.json", ctx.threads, eos_token_ids=stops
        )
    else:
        gen = DecoderGenerator(
            inputs[c["source"]].file("model.onnx"), tok_dir / "tokenizer.json", ctx.threads, eos_token_ids=stops
        )
    prefix = common_prefix([gen.encode(p) for p in prompts])
    gen.set_prefix(prefix)
    with tqdm(total=len(prompts), desc=call.key, unit="row", mininterval=5) as bar:
        answers = gen.generate_batch(
            prompts, c["max_new_tokens"], task.stop_strings, c["eval_batch_size"], progress=bar.update
        )
    agreement: list[list[int]] = []
    if c["agreement"]:
        gen.set_prefix([])
        for text in evl.texts[: g.agreement_prompts]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            agreement.append(gen.generate_ids(ids, g.agreement_tokens)[0])
    seconds = time.perf_counter() - t0
    parsed = [task.parse(a) for a in answers]
    correct = sum(int(p == int(y)) for p, y in zip(parsed, evl.labels, strict=True))
    metrics = {
        "variant": c["variant"],
        "accuracy": correct / len(prompts),
        "correct": correct,
        "eval_rows": len(prompts),
        "unparsed": sum(p is None for p in parsed),
        "max_new_tokens": c["max_new_tokens"],
        "batch_size": c["eval_batch_size"],
        "prefix_ids": prefix,
        "seconds": round(seconds, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "answers.json").write_text(json.dumps(answers))
    if agreement:
        (out / "agreement.json").write_text(json.dumps(agreement))
    log.info(
        "llm-evaluate: %s accuracy %.2f%% (%d unparsed answers) in %.0f s",
        c["variant"],
        100 * metrics["accuracy"],
        metrics["unparsed"],
        seconds,
    )
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# tokens per second


@register(
    "llm-bench",
    kind="bench",
    help="Time to first token, decode tokens/s, peak memory and load time per variant, a fresh process per variant "
    "and round.",
    version=2,
)
def llm_bench(ctx: RunContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    c = call.config
    g = ctx.recipe.generation
    assert g is not None
    tokenizer = load_tokenizer(inputs["llm-finetune"].path)
    task = prompt_task(ctx)
    prompts = [
        tokenizer(task.prompt(tokenizer, t), add_special_tokens=False)["input_ids"]
        for t in ctx.eval.texts[: g.bench_prompts]
    ]
    jobs = []
    for v in c["variants"]:
        path = inputs[v["source"]].path if v["format"] == "pytorch" else inputs[v["source"]].file("model.onnx")
        job = {
            "format": v["format"],
            "model": str(path),
            "threads": ctx.threads,
            "prompts": prompts,
            "new_tokens": g.bench_new_tokens,
        }
        (out / f"job-{v['name']}.json").write_text(json.dumps(job))
        jobs.append(v["name"])
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    from tqdm import tqdm

    bar = tqdm(total=g.bench_rounds * len(jobs), desc="llm-bench", unit="process")
    try:
        for r in range(g.bench_rounds):
            for name in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
                time.sleep(0.05)
                results[name].append(_measure(out / f"job-{name}.json", ctx.threads))
                bar.update(1)
    finally:
        bar.close()
        for f in out.glob("job-*.json"):
            f.unlink()
    variants = {}
    for name, rounds in results.items():
        ttft = [x for r in rounds for x in r["first_token_seconds"]]
        per_round_tps = [r["decode_tokens"] / r["decode_seconds"] for r in rounds]
        variants[name] = {
            "ttft_ms": {
                "p50": 1e3 * float(np.median(ttft)),
                "p90": 1e3 * float(np.percentile(ttft, 90)),
                "n": len(ttft),
            },
            "decode_tokens_per_second": float(np.median(per_round_tps)),
            "decode_tokens_per_second_rounds": per_round_tps,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds),
            "load_seconds": float(np.median([r["load_seconds"] for r in rounds])),
            "prompt_tokens": [len(p) for p in prompts],
            "new_tokens": g.bench_new_tokens,
        }
        log.info(
            "llm-bench: %-24s TTFT p50 %.0f ms  decode %.1f tokens/s  peak RSS %.0f MB",
            name,
            variants[name]["ttft_ms"]["p50"],
            variants[name]["decode_tokens_per_second"],
            variants[name]["peak_rss_bytes"] / 1e6,
        )
    from toolchain.provenance import git_commit

    data = {"threads": ctx.threads, "rounds": g.bench_rounds, "git_commit": git_commit(), "variants": variants}
    (out / "bench.json").write_text(json.dumps(data, indent=2))
    return {"threads": ctx.threads, "rounds": g.bench_rounds, "variants": list(variants)}


def _measure(job: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "toolchain.llm.measure", str(job)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise child_failed("llm-bench", f"the measure process for {job.stem}", proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])
