"""Fault injection: the pipeline is killed during fine-tuning (after a checkpoint), during export and during
quantization; every rerun keeps what was finished, resumes the rest, and ends with the same files and accuracy as a
run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict, write_recipe

from toolchain.runtime import sha256_file

pytestmark = pytest.mark.slow


def _recipe(tiny_model: Path, folder: Path) -> Path:
    data = tiny_recipe_dict(tiny_model)
    data["finetune"]["checkpoint_every"] = 5
    data["compile"]["quantize"] = ["dynamic-int8"]
    data["bench"].update(
        batch_sizes=[1], seq_lens=[16], rounds=1, min_iters=3, warmup=1, optimum_baseline=False, targets=["cpu"]
    )
    data["budget"]["latency_case"] = "b1_s16"
    data["bundle"] = {"ort_format": False}
    return write_recipe(folder, data)


def _command(recipe: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "toolchain", "run", str(recipe), "--runs", str(runs)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run_until(recipe: Path, runs: Path, pattern: str, sig: int) -> tuple[int, str]:
    """Start a run; the moment a path matching `pattern` (under the run's stages folder) appears, send `sig`."""
    stages = runs / "tiny" / "stages"
    runs.mkdir(parents=True, exist_ok=True)
    log = runs.parent / f"run-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(_command(recipe, runs), stdout=out, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if stages.is_dir() and any(stages.glob(pattern)):
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        code = proc.wait(timeout=600)
    return code, log.read_text()


def _finish(recipe: Path, runs: Path) -> str:
    out = subprocess.run(_command(recipe, runs), capture_output=True, text=True, env=_env(), timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def _status(log: str, key: str) -> str:
    """'reused' or 'done' from the run log's line for a stage."""
    line = next(
        line for line in log.splitlines() if f"stage {key} " in line and (" reused " in line or " done " in line)
    )
    return "reused" if " reused " in line else "done"


def _results(runs: Path) -> dict:
    run = runs / "tiny"
    stages = run / "stages"

    def only(prefix: str) -> Path:
        (folder,) = [p for p in stages.glob(f"{prefix}-*") if (p / "artifact.json").is_file()]
        return folder

    report = json.loads((run / "report.json").read_text())
    return {
        "weights": sha256_file(only("finetune") / "model.safetensors"),
        "export": sha256_file(only("export") / "model.onnx"),
        "quantized": sha256_file(only("quantize.onnx-int8-dynamic") / "model.onnx"),
        "bundle_model": sha256_file(run / "bundle" / "model.onnx"),
        "accuracy": {v["name"]: v["accuracy"] for v in report["variants"]},
        "predictions": json.loads((only("evaluate.onnx-int8-dynamic") / "metrics.json").read_text())["predictions"],
    }


def test_killed_runs_resume_and_end_like_an_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    recipe = _recipe(tiny_model, tmp_path)
    reference = tmp_path / "reference" / "runs"
    _finish(recipe, reference)
    want = _results(reference)

    runs = tmp_path / "interrupted" / "runs"
    # 1. SIGKILL in the middle of fine-tuning, once a checkpoint exists
    code, log = _run_until(recipe, runs, ".checkpoints/finetune-*/step-*", signal.SIGKILL)
    assert code == -signal.SIGKILL, log[-2000:]
    assert not any((runs / "tiny" / "stages").glob("finetune-*/artifact.json"))

    # 2. rerun: fine-tuning resumes from the checkpoint; SIGKILL during export
    code, log = _run_until(recipe, runs, ".tmp-export-*", signal.SIGKILL)
    assert code == -signal.SIGKILL, log[-2000:]
    assert "finetune: resuming from" in log
    assert any((runs / "tiny" / "stages").glob("finetune-*/artifact.json"))
    assert not any((runs / "tiny" / "stages" / ".checkpoints").glob("finetune-*")), "spent checkpoints are removed"

    # 3. rerun: fine-tuning is reused, the half export removed and rebuilt; Ctrl-C during quantization
    code, log = _run_until(recipe, runs, ".tmp-quantize.*", signal.SIGINT)
    assert code == 130, log[-2000:]
    assert "half-written folder" in log and _status(log, "finetune") == "reused"
    assert "interrupted: completed stages are kept" in log and "Traceback" not in log

    # 4. rerun to the end: nothing before quantization reruns
    log = _finish(recipe, runs)
    for key in ("finetune", "export", "optimize"):
        assert _status(log, key) == "reused", key
    assert _status(log, "quantize.onnx-int8-dynamic") == "done"

    got = _results(runs)
    assert got == want  # the same weights, graphs, predictions and accuracy, byte for byte
