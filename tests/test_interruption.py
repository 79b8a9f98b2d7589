"""Fault injection at named points (toolchain/core/faults.py, TOOLCHAIN_FAULT), never a race against a running process.

Every registered stage, and the copy of the bundle into place, is stopped in the middle of its work (an exception
the toolchain does not know) and just before its artifact is renamed into place (Ctrl-C or SIGTERM); a run is also
killed outright (SIGKILL) after a training checkpoint, with a whole artifact.json in a folder not yet renamed, and
halfway through swapping the bundle. Every rerun keeps what was finished, and the
last one ends with the same files as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    tiny_embedding_recipe,
    tiny_generation_recipe,
    tiny_pair_recipe,
    tiny_recipe_dict,
    tiny_tagging_recipe,
    write_recipe,
)
from fake_peers import fake_environment

from toolchain.cli import main
from toolchain.core.faults import ENV
from toolchain.engine import load_all
from toolchain.llm import peers

pytestmark = pytest.mark.slow

# (point, action, exit code): an unknown exception mid-stage; Ctrl-C (SIGINT) or a `kill` (SIGTERM), every other
# stage, with the artifact whole but not in place
STOPS = {"SIGINT": (130, "interrupted: "), "SIGTERM": (143, "terminated: ")}


def _faults(i: int) -> tuple[tuple[str, str, int], ...]:
    stop = "SIGINT" if i % 2 == 0 else "SIGTERM"
    return (("mid-stage", "raise", 1), ("before-rename", stop, STOPS[stop][0]))


def _classifier_recipe(tiny_model: Path, folder: Path) -> Path:
    """Every classifier stage: fine-tuning with checkpoints, distillation, export, fusion, quantization, Optimum's
    baseline, evaluation, bench, bundle."""
    data = tiny_recipe_dict(tiny_model)
    data["finetune"]["checkpoint_every"] = 5
    data["compile"]["distill"] = {"num_layers": 1, "epochs": 1, "lr": 3.0e-3, "precision": "fp32"}
    data["compile"]["quantize"] = ["dynamic-int8"]
    data["bench"].update(batch_sizes=[1], seq_lens=[16], rounds=1, min_iters=3, warmup=1, targets=["cpu"])
    # exactly one shippable variant fits (int8, 1.0 MB; fp32 is 4 MB), so which one ships never depends on times
    data["budget"].update(latency_case="b1_s16", max_accuracy_drop=1.0, max_size_mb=2.0)
    data["bundle"] = {"ort_format": False}
    return write_recipe(folder, data)


def _generation_recipe(model: Path, folder: Path) -> Path:
    """The generation recipe with one int4 variant and a llama.cpp peer (a stand-in environment under folder/cache,
    tests/fake_peers.py: the peer stage is walked like the others)."""
    data = tiny_generation_recipe(model)
    data["compile"]["quantize"] = [{"mode": "int4", "block_size": 32}]
    data["generation"]["peers"] = ["llama.cpp-q4_0"]
    data["budget"]["max_size_mb"] = 12.85  # only int4 fits (12.7 MB; fp32 13.0), whatever decodes faster
    return write_recipe(folder, data)


TASK_RECIPES = {"embedding": tiny_embedding_recipe, "tagging": tiny_tagging_recipe, "pairs": tiny_pair_recipe}


def _task_recipe(kind: str, model: Path, folder: Path) -> Path:
    """The embedding, tagging or pair recipe on the tiny model, where only the int8 variant fits the budget (1.0 MB
    against fp32's 4 MB), so which one ships never depends on times."""
    data = TASK_RECIPES[kind](model, f"tiny-{kind}")
    data["budget"]["max_size_mb"] = 2.0
    data["bundle"] = {"ort_format": False}
    if kind == "embedding":  # the student branch too
        data["compile"]["distill"] = {"num_layers": 1, "epochs": 1, "lr": 1.0e-3, "batch_size": 16, "max_length": 32}
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(folder, data)


# Files that hold measured times: compared without them (a rerun measures again), and without the step a resumed
# training started from (the weights it ends with are compared byte for byte).
TIMED_KEYS = {"train_seconds", "tokens_per_second", "seconds", "eval_seconds", "resumed_from_step"}


def _timeless(name: str, data: Any) -> Any:
    if name == "bench.json":  # nothing but timings: the variants and cases measured
        return sorted(data["variants"])
    if name == "manifest.json":  # the bundle's measured latencies and memory
        data["metrics"] = {k: v for k, v in data["metrics"].items() if "accuracy" in k or k.startswith("eval")}
        data["lineage"].pop("stages", None)  # lists this run's stages, timings included
        if "app" in data:  # what starting it took in an app process: measured
            data["app"] = {k: v for k, v in data["app"].items() if k not in ("cold_start_seconds", "peak_rss_bytes")}
        return data
    if isinstance(data, dict):
        return {k: _timeless(name, v) for k, v in data.items() if k not in TIMED_KEYS}
    return data


def artifacts(run: Path) -> dict[str, Any]:
    """Every complete artifact of a run: its id and each file's sha256 (timing files as their timeless content)."""
    out = {}
    for record in sorted((run / "stages").glob("*/artifact.json")):
        data = json.loads(record.read_text())
        files = {}
        for rel, digest in data["files"].items():
            name = rel.rsplit("/", 1)[-1]
            if name in ("bench.json", "manifest.json", "train_log.json", "metrics.json"):
                files[rel] = _timeless(name, json.loads((record.parent / rel).read_text()))
            elif name.endswith(".log"):  # a peer tool's output: its timings and the folder it wrote in
                files[rel] = "log"
            else:
                files[rel] = digest
        out[data["key"]] = {"id": data["id"], "files": files}
    bundle = run / "bundle"
    out["<bundle>"] = {
        p.name: _timeless("manifest.json", json.loads(p.read_text())) if p.name == "manifest.json" else p.read_bytes()
        for p in sorted(bundle.iterdir())
    }
    report = json.loads((run / "report.json").read_text())
    out["<accuracy>"] = {v["name"]: v["accuracy"] for v in report["variants"]}
    return out


def _run(recipe: Path, runs: Path, monkeypatch: pytest.MonkeyPatch, capsys, fault: str | None) -> tuple[int, str]:
    if fault is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, fault)
    code = main(["run", str(recipe), "--runs", str(runs)])
    return code, capsys.readouterr().err


def _complete(run: Path) -> set[str]:
    return {json.loads(p.read_text())["key"] for p in (run / "stages").glob("*/artifact.json")}


@pytest.fixture(scope="module")
def classifier_reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("reference")
    recipe = _classifier_recipe(tiny_model, folder)
    assert main(["run", str(recipe), "--runs", str(folder / "runs")]) == 0
    return recipe, artifacts(folder / "runs" / "tiny")


@pytest.fixture(scope="module")
def generation_reference(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("reference-gen")
    recipe = _generation_recipe(tiny_chat_llama, folder)
    fake_environment(folder / "cache", peers.LLAMA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLCHAIN_CACHE", str(folder / "cache"))
        assert main(["run", str(recipe), "--runs", str(folder / "runs")]) == 0
    return recipe, artifacts(folder / "runs" / "tiny-gen")


def _walk(reference: tuple[Path, dict], run_name: str, tmp_path: Path, monkeypatch, capsys) -> list[str]:
    """Stop the run at each point of each stage in turn (each rerun goes one fault further), then finish it; the
    stage names walked."""
    recipe, want = reference
    runs = tmp_path / "runs"
    run = runs / run_name
    lineage = json.loads((recipe.parent / "runs" / run_name / "lineage.json").read_text())
    names = list(dict.fromkeys(s["stage"] for s in lineage["stages"]))
    first_key = {name: next(s["key"] for s in lineage["stages"] if s["stage"] == name) for name in names}
    for i, name in enumerate([*names, "publish"]):
        key = first_key.get(name, "publish")
        for point, action, want_code in _faults(i):
            before = _complete(run) if run.is_dir() else set()
            code, err = _run(recipe, runs, monkeypatch, capsys, f"{name}:{point}:{action}")
            where = f"{name}:{point}:{action}"
            assert code == want_code, f"{where}: exit {code}\n{err[-3000:]}"
            assert "Traceback" not in err, f"{where}\n{err[-3000:]}"
            last = err.strip().splitlines()[-1]
            if action == "raise":
                assert last.startswith(f"error: stage {key} failed unexpectedly: InjectedFault: "), where
                log = Path(last.rsplit("full traceback: ", 1)[1])
                assert "Traceback (most recent call last)" in log.read_text(), where
            else:
                assert last.startswith(STOPS[action][1]) and "run the same command again" in last, where
                assert ("no stage was complete yet" if not before else "complete and will be reused") in last
            done = _complete(run)
            assert before <= done, f"{where}: a finished stage was lost: {before - done}"
            assert key not in done, f"{where}: the interrupted stage looks complete"
            assert not list((run / "stages").glob(".tmp-*")), f"{where}: a half-written folder was left"
            if name == "publish" and point == "mid-stage":
                assert not (run / "bundle").exists()
    code, err = _run(recipe, runs, monkeypatch, capsys, None)
    assert code == 0, err[-3000:]
    assert artifacts(run) == want  # the same ids, weights, graphs, predictions, bundle and accuracies
    return names


def test_every_classifier_stage_stopped_at_each_point_resumes_to_the_same_files(
    classifier_reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    walked = _walk(classifier_reference, "tiny", tmp_path, monkeypatch, capsys)
    assert {"finetune", "teacher-logits", "distill", "optimum-baseline", "bench", "bundle"} <= set(walked)


def test_every_generation_stage_stopped_at_each_point_resumes_to_the_same_files(
    generation_reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(generation_reference[0].parent / "cache"))  # its stand-in peer
    walked = _walk(generation_reference, "tiny-gen", tmp_path, monkeypatch, capsys)
    assert walked[0] == "llm-base" and walked[-1] == "llm-bundle" and "llm-peer" in walked


@pytest.mark.parametrize("kind", sorted(TASK_RECIPES))
def test_every_stage_of_the_other_tasks_stopped_at_each_point_resumes_to_the_same_files(
    kind: str, tiny_model: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import yaml

    folder = tmp_path / "reference"
    recipe = _task_recipe(kind, tiny_model, folder)
    if kind == "embedding":  # two int8 graphs fit 2 MB (the student's is one small layer smaller): budget between them
        probe = tmp_path / "probe"
        assert main(["run", str(recipe), "--runs", str(probe)]) == 0
        report = json.loads((probe / "tiny-embedding" / "report.json").read_text())
        sizes = {v["name"]: v["size_bytes"] for v in report["variants"]}
        data = yaml.safe_load(recipe.read_text())
        data["budget"]["max_size_mb"] = (sizes["onnx-int8-dynamic"] + sizes["onnx-int8-dynamic-student"]) / 2e6
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", str(recipe), "--runs", str(folder / "runs")]) == 0
    if kind == "embedding":
        assert json.loads((folder / "runs" / "tiny-embedding" / "report.json").read_text())["shipped"].endswith(
            "-student"
        )
    want = artifacts(folder / "runs" / f"tiny-{kind}")
    walked = _walk((recipe, want), f"tiny-{kind}", tmp_path / "walk", monkeypatch, capsys)
    bundles = {"embedding": "embed-bundle", "tagging": "tag-bundle", "pairs": "pair-bundle"}
    assert walked[-1] == bundles[kind] and "quantize" in walked


def test_the_walks_cover_every_registered_stage(tiny_model: Path, tiny_chat_llama: Path, tmp_path: Path) -> None:
    from toolchain.core.context import RunContext
    from toolchain.core.task import task_for
    from toolchain.recipe.load import load_recipe

    recipes = [_classifier_recipe(tiny_model, tmp_path), _generation_recipe(tiny_chat_llama, tmp_path)]
    recipes += [_task_recipe(kind, tiny_model, tmp_path) for kind in TASK_RECIPES]
    planned = set()
    for path in recipes:
        recipe = load_recipe(path)
        calls, _ = task_for(recipe).plan(RunContext(recipe, tmp_path / "runs"))
        planned |= {c.stage for c in calls}
    planned |= {"bundle", "llm-bundle", "embed-bundle", "tag-bundle", "pair-bundle"}  # planned after the choice
    assert planned == set(load_all()), f"registered but not walked: {set(load_all()) - planned}"


def _subprocess(recipe: Path, runs: Path, fault: str | None, *extra: str) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    out = subprocess.run(
        [sys.executable, "-m", "toolchain", "run", str(recipe), "--runs", str(runs), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    return out.returncode, out.stdout + out.stderr


def test_killed_runs_resume_to_the_same_files(
    classifier_reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, caplog
) -> None:
    recipe, want = classifier_reference
    runs = tmp_path / "runs"
    stages = runs / "tiny" / "stages"

    # 1. SIGKILL once the first training checkpoint is written
    code, out = _subprocess(recipe, runs, "finetune:after-checkpoint-1:SIGKILL")
    assert code == -signal.SIGKILL, out[-2000:]
    assert not list(stages.glob("finetune-*/artifact.json")) and list(stages.glob(".checkpoints/finetune-*/step-*"))

    # 2. fine-tuning resumes from it; SIGKILL with the export whole in its temporary folder, artifact.json included
    code, out = _subprocess(recipe, runs, "export:before-rename:SIGKILL")
    assert code == -signal.SIGKILL, out[-2000:]
    assert "finetune: resuming from" in out
    assert not list(stages.glob(".checkpoints/finetune-*")), "spent checkpoints are removed"
    (half,) = stages.glob(".tmp-export-*")
    assert (half / "artifact.json").is_file() and not list(stages.glob("export-*/artifact.json"))

    # 3. to the end: the half export is removed and rebuilt, nothing finished reruns
    code, err = _run(recipe, runs, monkeypatch, capsys, None)
    assert code == 0, err[-3000:]
    assert not list(stages.glob(".tmp-*")) and artifacts(runs / "tiny") == want

    # 4. a damaged bundle is replaced, with SIGKILL between moving it aside and moving the new one into place:
    #    the next run puts the old one back first, then replaces it
    (runs / "tiny" / "bundle" / "model.onnx").write_bytes(b"damaged")
    code, out = _subprocess(recipe, runs, "publish:before-rename:SIGKILL")
    assert code == -signal.SIGKILL, out[-2000:]
    assert not (runs / "tiny" / "bundle").exists() and list((runs / "tiny").glob(".bundle.old-*"))
    code, err = _run(recipe, runs, monkeypatch, capsys, None)
    assert code == 0 and "put back as bundle" in caplog.text, err[-3000:]
    assert not list((runs / "tiny").glob(".bundle.*"))
    assert artifacts(runs / "tiny") == want


def _copy_run(reference: tuple[Path, dict], run_name: str, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    recipe, _ = reference
    runs = tmp_path / "runs"
    shutil.copytree(recipe.parent / "runs" / run_name, runs / run_name, ignore=shutil.ignore_patterns("logs", ".lock"))
    return recipe, runs


@pytest.mark.parametrize("kind", ["classifier", "generation"])
def test_a_failing_bench_child_is_one_line_and_its_output_goes_to_the_log(
    kind: str, request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    stage, name = ("bench", "tiny") if kind == "classifier" else ("llm-bench", "tiny-gen")
    recipe, runs = _copy_run(request.getfixturevalue(f"{kind}_reference"), name, tmp_path)
    monkeypatch.setenv(ENV, f"{stage}:child:raise")
    assert main(["run", str(recipe), "--runs", str(runs), "--force", stage]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith(f"error: stage {stage} failed: ") and "failed in its process (exit code 1): " in last
    assert "InjectedFault: fault injected by TOOLCHAIN_FAULT" in last
    log = Path(last.rsplit("its output is in ", 1)[1])
    assert "Traceback (most recent call last)" in log.read_text()  # the child's, kept in the run's log
    assert len(list((runs / name / "stages").glob(f"{stage}-*/artifact.json"))) == 1  # the earlier bench is kept


def test_a_failure_outside_the_stages_names_the_step_and_what_is_kept(
    classifier_reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from toolchain.report import classification as report

    recipe, runs = _copy_run(classifier_reference, "tiny", tmp_path)
    before = (runs / "tiny" / "report.json").read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("latency_ms")

    monkeypatch.setattr(report, "write", broken)
    assert main(["run", str(recipe), "--runs", str(runs)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stage report failed unexpectedly: KeyError: 'latency_ms'; finetune, ")
    assert "more are complete and will be reused; full traceback: " in last and "Traceback" not in err
    assert (runs / "tiny" / "report.json").read_bytes() == before  # the last report is untouched
    # --verbose prints the traceback too (anywhere on the command line)
    assert main(["run", str(recipe), "--runs", str(runs), "--verbose"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_failure_outside_any_run_is_one_line_with_its_traceback_in_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from toolchain.recipe import load as recipe_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(recipe_module, "load_recipe", broken)
    assert main(["validate", str(tmp_path / "x.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: validate failed unexpectedly: RuntimeError: a bug; full traceback: ")
    assert len(err.splitlines()) == 1
    assert "RuntimeError: a bug" in Path(err.rsplit("full traceback: ", 1)[1]).read_text()


def test_a_malformed_fault_spec_is_refused_naming_the_grammar(monkeypatch: pytest.MonkeyPatch) -> None:
    from toolchain.core import faults
    from toolchain.errors import ToolchainError

    assert faults.parse("quantize:mid-stage:SIGINT, finetune:after-step-3:raise:rank=1") == [
        faults.Fault("quantize", "mid-stage", "SIGINT"),
        faults.Fault("finetune", "after-step-3", "raise", 1),
    ]
    for bad in ("export:midstage:raise", "export:mid-stage:SIGHUP", "export:mid-stage", "a:start:raise:rank=x"):
        with pytest.raises(ToolchainError, match="TOOLCHAIN_FAULT"):
            faults.parse(bad)
    monkeypatch.delenv(ENV, raising=False)
    faults.point("export", "export", "mid-stage")  # inert without the variable
    monkeypatch.setenv(ENV, "export:mid-stage:raise:rank=1")
    faults.point("export", "export", "mid-stage")  # another rank's fault
    with pytest.raises(faults.InjectedFault):
        monkeypatch.setenv("RANK", "1")
        faults.point("export", "export", "mid-stage")
