"""The `embed-evaluate` stage: one embedder variant's Spearman and Pearson (x 100) of the cosine similarity against
the gold scores, on the eval pairs and the test pairs, and its fidelity to the fp32 PyTorch embedder (the mean
cosine between the two embeddings of each eval text, the share of each corpus text's nearest neighbours kept)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from toolchain import model_inputs
from toolchain.compile.parity import check_onnx, graph_file
from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.data import Split, read_corpus
from toolchain.embed.metrics import correlations, mean_cosine_to, neighbours_kept, pair_cosines
from toolchain.runtime import TextEncoder, make_classifier

PYTORCH_BATCH = 32
EMBEDDINGS = "embeddings.npz"  # eval, test and corpus texts' embeddings, for the fidelity of the other variants


class EmbedEvaluateConfig(StageConfig):
    variant: str
    format: str  # pytorch | onnx
    max_length: int
    batch_size: int
    reference: str | None  # the evaluate artifact holding the fp32 PyTorch embeddings (None: this is it, or none)
    corpus: str | None
    corpus_text: str
    corpus_rows: int
    corpus_sha256: str | None
    neighbours: int


def _texts(split: Split) -> list[str]:
    assert split.pairs is not None
    return split.texts + split.pairs


def _embedder(cfg: EmbedEvaluateConfig, model: Path, hf_dir: Path, threads: int) -> Any:
    """texts -> (N, d) float32 embeddings, through the variant's own runtime."""
    tokenizer = hf_dir / "tokenizer.json"
    if cfg.format == "pytorch":
        from toolchain.evaluate.torch_model import load_pytorch, pytorch_embeddings

        encoder = TextEncoder(tokenizer, cfg.max_length, fields=model_inputs.ENCODING_FIELD)
        pooled = load_pytorch(model)
        batch = max(cfg.batch_size, PYTORCH_BATCH)  # fp32 PyTorch's outputs do not depend on what shares a batch
        return lambda texts, tick: pytorch_embeddings(pooled, encoder, texts, batch, tick)
    graph = graph_file(model)
    check_onnx("embed-evaluate", graph)
    runner = make_classifier(
        "onnxruntime", graph, tokenizer, cfg.max_length, threads, fields=model_inputs.ENCODING_FIELD
    )
    return lambda texts, tick: runner.logits(texts, cfg.batch_size, tick)


@register(
    "embed-evaluate",
    kind="metrics",
    help="Spearman/Pearson of one embedder variant on the eval and test pairs, and its fidelity to fp32 PyTorch.",
    config=EmbedEvaluateConfig,
)
def embed_evaluate(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = ctx.config(EmbedEvaluateConfig)
    evl, test = ctx.eval, ctx.test
    corpus: list[str] = []
    if cfg.corpus is not None and cfg.corpus_sha256 is not None:
        corpus = read_corpus(ctx.data_file(cfg.corpus, cfg.corpus_sha256), cfg.corpus_text, cfg.corpus_rows)
    sets = {"eval": _texts(evl)} | ({"test": _texts(test)} if test is not None else {}) | {"corpus": corpus}
    run = _embedder(cfg, inputs[call.inputs[0]].path, inputs["finetune"].path, ctx.threads)
    bar = tqdm(total=sum(len(t) for t in sets.values()), desc=call.key, unit="text", mininterval=2.0)
    vectors = {name: run(texts, bar.update) if texts else np.zeros((0, 0), np.float32) for name, texts in sets.items()}
    bar.close()
    np.savez(out / EMBEDDINGS, **vectors)  # type: ignore[arg-type]
    metrics: dict[str, Any] = {"variant": cfg.variant, "dimension": int(vectors["eval"].shape[1])}
    for name, split in (("eval", evl), ("test", test)):
        if split is None:
            continue
        n = len(split)
        cosines = pair_cosines(vectors[name][:n], vectors[name][n:])
        metrics[name] = {"pairs": n, **correlations(cosines, split.labels), "cosines": cosines.round(6).tolist()}
    if cfg.reference is not None:
        ref = np.load(inputs[cfg.reference].file(EMBEDDINGS))
        metrics["fidelity"] = {
            "mean_cosine_eval": mean_cosine_to(ref["eval"], vectors["eval"]),
            "eval_texts": len(sets["eval"]),
        }
        if corpus:
            kept = neighbours_kept(ref["corpus"], vectors["corpus"], cfg.neighbours)
            metrics["fidelity"] |= {
                "neighbours_kept": kept,
                "neighbours": cfg.neighbours,
                "corpus_texts": len(corpus),
                "mean_cosine_corpus": mean_cosine_to(ref["corpus"], vectors["corpus"]),
            }
    (out / "metrics.json").write_text(json.dumps(metrics))
    summary = {k: round(metrics[k]["spearman"], 2) for k in ("eval", "test") if k in metrics}
    return {"variant": cfg.variant, "spearman": summary, "fidelity": metrics.get("fidelity")}
