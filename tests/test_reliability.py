"""Resource checks before compute, ONNX files checked before they run, stale half-written folders removed."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict, write_recipe

from toolchain import resources
from toolchain.cli import main
from toolchain.compile.parity import check_onnx
from toolchain.core import store
from toolchain.core.lock import run_lock
from toolchain.errors import StageError
from toolchain.recipe.load import load_recipe

Usage = namedtuple("Usage", "total used free")


def test_a_disk_too_small_fails_before_any_compute(tiny_model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe_dict(tiny_model))
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda _: Usage(10**9, 10**9 - 1000, 1000))
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GB more disk" in err and "has 0.0 GB free" in err and "Traceback" not in err
    assert not (runs / "tiny" / "stages").exists() or not any((runs / "tiny" / "stages").iterdir())


def test_the_estimate_grows_with_what_the_recipe_builds(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_recipe_dict(tiny_model)
    small = resources.estimate(load_recipe(write_recipe(tmp_path, data)), tiny_model)
    data["compile"]["quantize"] = ["dynamic-int8", "int4", "fp16"]
    data["bundle"] = {"tokenizer": "in-graph"}
    big = resources.estimate(load_recipe(write_recipe(tmp_path, data)), tiny_model)
    assert big["disk_bytes"] > small["disk_bytes"] > (tiny_model / "model.safetensors").stat().st_size
    assert small["memory_bytes"] > resources.RUNTIME_BYTES
    assert set(small["disk_parts"]) >= {"finetune", "export", "optimize", "quantize"}


def test_a_truncated_onnx_file_is_refused_naming_it(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    good = tmp_path / "good.onnx"
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), good)
    check_onnx("evaluate.x", good)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(StageError, match=r"model\.onnx is not a valid ONNX model"):
        check_onnx("evaluate.x", bad)


def test_half_written_folders_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    stages = tmp_path / "stages"
    (stages / ".tmp-export-abc-123").mkdir(parents=True)
    (stages / ".tmp-export-abc-123" / "model.onnx").write_bytes(b"half")
    (stages / ".checkpoints" / "finetune-abc").mkdir(parents=True)
    (stages / "export-abc").mkdir()
    assert store.remove_stale_temporaries(stages) == [".tmp-export-abc-123"]
    assert sorted(p.name for p in stages.iterdir()) == [".checkpoints", "export-abc"]
    shutil.rmtree(stages)
    assert store.remove_stale_temporaries(stages) == []


def test_a_second_run_of_the_same_recipe_waits_for_nothing_and_says_who_holds_it(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe_dict(tiny_model))
    runs = tmp_path / "runs"
    with run_lock(runs / "tiny"):  # another run of this recipe is in progress
        assert main(["run", str(recipe), "--runs", str(runs)]) == 1
    err = capsys.readouterr().err
    assert "is in use by pid" in err and "try again" in err and "Traceback" not in err
    assert not (runs / "tiny" / "stages").exists()  # nothing was written by the refused run


def test_a_gpu_provider_that_falls_back_to_the_cpu_is_not_timed_under_its_name() -> None:
    import onnxruntime as ort

    from toolchain.evaluate.latency import available_targets, provider_fails

    assert provider_fails("CPUExecutionProvider") is None
    # asked for a provider it cannot start, onnxruntime runs on the CPU with only a warning; the probe sees that
    why = provider_fails("CUDAExecutionProvider")
    if "CUDAExecutionProvider" in ort.get_available_providers() and why is None:
        pytest.skip("CUDA starts on this machine")
    assert why is not None and "did not start" in why
    measured, skipped = available_targets(["cpu", "cuda"])
    assert measured == ["cpu"] and "cuda" in skipped


def test_a_disk_too_small_exits_2_for_a_generation_recipe_too(
    tiny_chat_llama: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from conftest import tiny_generation_recipe

    recipe = write_recipe(tmp_path, tiny_generation_recipe(tiny_chat_llama))
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda _: Usage(10**9, 10**9 - 1000, 1000))
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "GB are needed and 0.0 GB are free" in err and "Traceback" not in err
    assert not (runs / "tiny-gen" / "stages").exists() or not any((runs / "tiny-gen" / "stages").iterdir())
