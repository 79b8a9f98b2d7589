"""Shared fixtures: a tiny random-weight BERT built in-process, the real data root, recipe writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from toolchain.recipe import resolve_data_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def write_recipe(folder: Path, data: dict, name: str | None = None) -> Path:
    path = folder / f"{name or data.get('name', 'recipe')}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
