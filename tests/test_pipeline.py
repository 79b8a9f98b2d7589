"""The whole pipeline end to end on a tiny random BERT and real SST-2 rows: numbers, files, hashes, caching."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import node_app_compare, tiny_recipe_dict, write_recipe

from toolchain import engine
from toolchain.engine import load_all
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe
from toolchain.runtime import sha256_file


def _report(runs: Path) -> dict:
    return json.loads((runs / "tiny" / "report.json").read_text())


def test_report_contract_and_numbers(first_run) -> None:
    _, runs, ctx = first_run
    rep = _report(runs)
    assert rep["recipe"] == "tiny"
    for key in ("cpu_model", "cores_physical", "threads", "versions", "git_commit"):
        assert key in rep["environment"]
    names = [v["name"] for v in rep["variants"]]
    assert names == [
        "pytorch-fp32",
        "onnx-fp32",
        "onnx-fp32-optimized",
        "onnx-int8-dynamic",
        "optimum-int8-dynamic",
        "openvino-bf16",
        "openvino-nncf-int8",
    ]
    for v in rep["variants"]:
        assert v["format"] in ("pytorch", "onnx", "openvino") and v["precision"] in ("fp32", "int8", "bf16")
        assert v["peer"] == (v["name"] in ("optimum-int8-dynamic", "openvino-bf16", "openvino-nncf-int8"))
        assert 0 <= v["accuracy"] <= 1 and v["size_bytes"] > 0
        assert v["peak_rss_bytes"] > 50e6 and v["cold_start_seconds"] > 0  # measured in its own process
        assert set(v["latency_ms"]) == {"b1_s32", "b4_s32", "b1_real", "b4_real"}
        for stats in v["latency_ms"].values():
            assert stats["p50"] <= stats["p90"] <= stats["p99"] and stats["n"] >= 5
    by = {v["name"]: v for v in rep["variants"]}
    # fp32 ONNX computes the same function as PyTorch: same predictions on the eval rows.
    assert by["onnx-fp32"]["accuracy"] == by["pytorch-fp32"]["accuracy"]
    assert by["onnx-fp32-optimized"]["accuracy"] == by["pytorch-fp32"]["accuracy"]
    # The tiny model learned something from 1,500 real rows: clearly above the majority class.
    majority = max(np.bincount(ctx.eval.labels)) / len(ctx.eval)
    assert by["pytorch-fp32"]["accuracy"] > majority + 0.03
    # int8 weights are about a quarter of fp32 (the embedding table stays fp32 in dynamic quantization).
    assert by["onnx-int8-dynamic"]["size_bytes"] < 0.6 * by["onnx-fp32"]["size_bytes"]
    assert rep["shipped"] in names[1:4]  # never a peer
    assert (runs / "tiny" / "report.md").read_text().count("|") > 50
    assert (runs / "tiny" / "report.png").stat().st_size > 5000
    assert (runs / "tiny" / "report_training.png").stat().st_size > 5000
    assert rep["training"]["loss_curve"][-1]["step"] == ctx.artifacts["finetune"].meta["steps"]


def test_rounds_optimum_baseline_and_targets_in_the_report(first_run) -> None:
    import onnxruntime as ort

    _, runs, ctx = first_run
    rep = _report(runs)
    by = {v["name"]: v for v in rep["variants"]}
    assert rep["rounds"] == 2
    for v in rep["variants"]:
        for case, stats in v["latency_ms"].items():
            rounds = v["round_p50"][case]
            assert len(rounds) == 2 and min(rounds) <= stats["p50"] * 1.5  # one median per round (a process each)
            if v["name"] != "pytorch-fp32":
                lo, hi = v["latency_ratio_ci"][case]
                assert lo <= hi and lo > 0
    # Optimum's path from the same weights: a reference row, never shipped
    optimum = ctx.artifacts["optimum-baseline"].meta
    assert optimum["preset"] in ("avx512_vnni", "avx512", "avx2", "arm64") and optimum["optimization"] in ("O2", "O1")
    assert optimum["optimization"] == "O2" or "Unable to find data type" in optimum["failed_levels"]["O2"]
    for peer in ("optimum-int8-dynamic", "openvino-bf16", "openvino-nncf-int8"):
        assert rep["verdicts"][peer].startswith("peer: ") and "never shipped" in rep["verdicts"][peer]
    assert by["optimum-int8-dynamic"]["size_bytes"] < 0.6 * by["onnx-fp32"]["size_bytes"]
    # OpenVINO's peers, run by OpenVINO: bf16 inference of the fp32 export (same file), NNCF's int8 IR (smaller);
    # both agree with PyTorch on most eval rows
    assert by["openvino-bf16"]["size_bytes"] == by["onnx-fp32"]["size_bytes"]
    assert by["openvino-nncf-int8"]["size_bytes"] < 0.6 * by["onnx-fp32"]["size_bytes"]
    nncf = ctx.artifacts["openvino-nncf-baseline"].meta
    assert nncf["calibration_rows"] == 300 and nncf["drift_vs_pytorch"]["argmax_agreement"] >= 0.8
    for peer in ("openvino-bf16", "openvino-nncf-int8"):
        assert by[peer]["changed_vs_fp32"]["changed"] <= 0.1 * len(ctx.eval)
    md = (runs / "tiny" / "report.md").read_text()
    assert "## Against the peers" in md and f"shipped `{rep['shipped']}`" in md
    assert "`openvino-nncf-int8` (shipped / peer)" in md
    assert (runs / "tiny" / "report_latency.png").stat().st_size > 5000
    # a provider this onnxruntime build lacks is skipped with the reason, not silently
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        assert "cuda" in rep["targets"]["skipped"] and "- cuda: skipped: onnxruntime has no" in md
    if "TensorrtExecutionProvider" not in have:
        assert "tensorrt" in rep["targets"]["skipped"]
    assert rep["targets"]["measured"][0] == "cpu"


def test_accuracy_is_recomputed_from_stored_predictions(first_run) -> None:
    _, runs, ctx = first_run
    for v in _report(runs)["variants"]:
        metrics = json.loads(ctx.artifacts[f"evaluate.{v['name']}"].file("metrics.json").read_text())
        pred = np.array(metrics["predictions"])
        assert len(pred) == len(ctx.eval) == 300
        assert v["accuracy"] == pytest.approx(float((pred == ctx.eval.labels).mean()))
        if v["name"] != "pytorch-fp32":  # rows gained minus rows lost is the accuracy difference, exactly
            c = v["changed_vs_fp32"]
            base = next(x for x in _report(runs)["variants"] if x["name"] == "pytorch-fp32")
            assert v["correct"] - base["correct"] == c["fixed"] - c["broken"]


def test_export_parity_within_tolerance(first_run) -> None:
    _, _, ctx = first_run
    for key in ("export", "optimize"):
        parity = ctx.artifacts[key].meta["parity"]
        assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0 and parity["rows"] == 32


def test_bundle_manifest_hashes_and_runtime_in_fresh_process(first_run, tmp_path: Path) -> None:
    _, runs, ctx = first_run
    bundle = runs / "tiny" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"model.onnx", "tokenizer.json", "labels.json"} <= set(manifest["files"])
    for name, info in manifest["files"].items():
        assert sha256_file(bundle / name) == info["sha256"]
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["lineage"]["stages"][0]["stage"] == "finetune"
    shipped = manifest["variant"]
    assert (
        manifest["metrics"]["accuracy"]
        == _report(runs)["variants"][[v["name"] for v in _report(runs)["variants"]].index(shipped)]["accuracy"]
    )

    # the ORT-format copy for mobile / reduced builds computes the same logits
    import onnxruntime as ort

    from toolchain.model_inputs import ENCODING_FIELD
    from toolchain.runtime import TextEncoder

    assert manifest["mobile"]["ort_model"] == "model.ort" and "model.ort" in manifest["files"]
    ops = (bundle / "required_operators.config").read_text()
    assert "ai.onnx;" in ops and "MatMul" in ops
    feeds = TextEncoder(bundle / "tokenizer.json", 128, fields=ENCODING_FIELD).encode(ctx.eval.texts[:8])
    want = ort.InferenceSession(str(bundle / "model.onnx")).run(None, feeds)[0]
    got = ort.InferenceSession(str(bundle / "model.ort")).run(None, feeds)[0]
    assert np.allclose(got, want, atol=1e-4)
    assert manifest["bundle_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    forms = manifest["forms"]  # what each kind of app embeds, and its size
    assert forms["model.onnx + tokenizer"]["files"][:2] == ["model.onnx", "tokenizer.json"]
    strings_form = next(f for name, f in forms.items() if name.startswith("model.strings.onnx"))
    assert strings_form["bytes"] == manifest["files"]["model.strings.onnx"]["bytes"]
    assert "## Bundle" in (runs / "tiny" / "report.md").read_text()

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    result = _fresh_process_predict(copy, ctx.eval.texts, tmp_path, in_graph=False)
    assert "torch" not in result["heavy"] and "transformers" not in result["heavy"], result["heavy"]
    metrics = json.loads(ctx.artifacts[f"evaluate.{shipped}"].file("metrics.json").read_text())
    labels = manifest["labels"]
    assert result["labels"] == [labels[i] for i in metrics["predictions"]]


def _fresh_process_predict(bundle: Path, texts: list[str], tmp_path: Path, in_graph: bool) -> dict:
    """Labels from Predictor in a new interpreter, and which heavy libraries it imported."""
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(texts))
    script = textwrap.dedent(f"""
        import json, sys
        from toolchain.runtime import Predictor
        p = Predictor.load({str(bundle)!r}, threads=1, in_graph={in_graph})
        preds = p.predict(json.load(open({str(path)!r})))
        heavy = sorted(m for m in ("torch", "transformers", "optimum", "tokenizers") if m in sys.modules)
        print(json.dumps({{"labels": [x.label for x in preds], "heavy": heavy}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_strings_in_bundle_classifies_raw_text_like_the_tokenizer_beside_bundle(first_run, tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _, runs, ctx = first_run
    bundle = runs / "tiny" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    strings = manifest["strings_model"]
    assert strings["file"] == "model.strings.onnx" and "model.strings.onnx" in manifest["files"]
    assert [(i["name"], i["type"]) for i in strings["inputs"]] == [("text", "string")]
    assert [o["name"] for o in strings["outputs"]][:2] == ["label", "scores"]
    # the same accuracy on the whole eval split as the shipped model.onnx (measured at batch 1 by the pipeline)
    assert strings["eval_rows"] == len(ctx.eval) == 300
    assert strings["accuracy"] == manifest["metrics"]["accuracy"]
    assert strings["agrees_with_model_onnx"].startswith("300/300")

    # raw onnxruntime with only the extensions library: a string in, a label string and scores out
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(str(bundle / "model.strings.onnx"), opts)
    label, scores, _ = session.run(None, {"text": np.array([ctx.eval.texts[0]], dtype=object)})
    assert label.shape == (1,) and label[0] in manifest["labels"]
    assert scores.shape == (1, 2) and abs(float(scores.sum()) - 1) < 1e-5

    # in a fresh process, from a copy: neither torch/transformers nor even the tokenizers library is imported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    result = _fresh_process_predict(copy, ctx.eval.texts, tmp_path, in_graph=True)
    assert result["heavy"] == [], f"the strings-in runtime imported {result['heavy']}"
    metrics = json.loads(ctx.artifacts[f"evaluate.{manifest['variant']}"].file("metrics.json").read_text())
    assert result["labels"] == [manifest["labels"][i] for i in metrics["predictions"]]


def test_strings_in_model_is_checked_at_batch_one_when_accuracy_is_measured_batched(first_run, tmp_path: Path) -> None:
    recipe_path, runs, _ = first_run
    runs_copy = tmp_path / "runs"
    shutil.copytree(runs, runs_copy)
    ctx = engine.run(load_recipe(recipe_path, ["evaluate.batch_size=4"]), runs_copy)
    manifest = json.loads((runs_copy / "tiny" / "bundle" / "manifest.json").read_text())
    assert manifest["preprocessing"]["batch_size"] == 4
    assert manifest["strings_model"]["agrees_with_model_onnx"] == "300/300 eval rows, batch 1"
    assert {r.key: r.status for r in ctx.records}["bundle"] == "ran"


def test_node_app_agrees_with_the_python_runtime_on_every_eval_row(first_run, tmp_path: Path) -> None:
    """examples/node (onnxruntime-node + the pure-JS tokenizer) against toolchain.runtime, row by row.
    .ci/run installs the npm packages and sets TOOLCHAIN_REQUIRE_NODE=1, so there it cannot skip."""
    compare = node_app_compare()
    app = PROJECT_ROOT / "examples" / "node"
    _, runs, ctx = first_run
    result = compare(runs / "tiny" / "bundle", ctx.eval.texts)
    assert result["rows"] == 300
    assert result["differ_rows"] == [] and result["agree"] == 300
    assert result["max_abs_logit_diff"] < 1e-4

    # the Node app refuses a changed bundle too, naming the file
    copy = tmp_path / "bundle"
    shutil.copytree(runs / "tiny" / "bundle", copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace("[UNK]", "[UNK2]", 1))
    out = subprocess.run(
        ["node", str(app / "classify.mjs"), str(copy)], input="a film\n", capture_output=True, text=True
    )
    assert out.returncode == 2 and "tokenizer.json does not match its sha256" in out.stderr


def test_tampered_bundle_is_refused(first_run, tmp_path: Path) -> None:
    from toolchain.runtime import BundleError, Predictor

    _, runs, _ = first_run
    copy = tmp_path / "bundle"
    shutil.copytree(runs / "tiny" / "bundle", copy)
    with (copy / "model.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"model\.onnx does not match"):
        Predictor.load(copy)


def test_second_run_reuses_every_stage(first_run) -> None:
    recipe_path, runs, first = first_run
    ctx = engine.run(load_recipe(recipe_path), runs)
    assert [r.status for r in ctx.records] == ["reused"] * len(ctx.records)
    assert [r.id for r in ctx.records] == [r.id for r in first.records]


def test_changed_quantize_setting_reruns_only_what_follows(first_run) -> None:
    recipe_path, runs, first = first_run
    recipe = load_recipe(recipe_path, ["compile.quantize=[{mode: dynamic-int8, per_channel: false}]"])
    ctx = engine.run(recipe, runs)
    status = {r.key: r.status for r in ctx.records}
    before = {r.key: r.id for r in first.records}
    assert all(ctx.artifacts[k].id == before[k] for k in ("finetune", "export", "optimize"))
    for key in (
        "finetune",
        "export",
        "optimize",
        "evaluate.pytorch-fp32",
        "evaluate.onnx-fp32",
        "evaluate.onnx-fp32-optimized",
    ):
        assert status[key] == "reused", key
    assert status["quantize.onnx-int8-dynamic-per-tensor"] == "ran"
    assert status["evaluate.onnx-int8-dynamic-per-tensor"] == "ran"
    assert status["bench"] == "ran"


def test_damaged_artifact_is_rebuilt(first_run, tmp_path: Path) -> None:
    recipe_path, runs, first = first_run
    runs_copy = tmp_path / "runs"
    shutil.copytree(runs, runs_copy)
    export_dir = runs_copy / "tiny" / "stages" / first.artifacts["export"].path.name
    model = export_dir / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    ctx = engine.run(load_recipe(recipe_path), runs_copy)
    status = {r.key: r.status for r in ctx.records}
    assert status["finetune"] == "reused" and status["export"] == "rebuilt"
    assert sha256_file(model) == sha256_file(first.artifacts["export"].file("model.onnx"))


# Stages this module's run does not use, and the end-to-end test that runs each of them.
EXERCISED_ELSEWHERE = {
    "teacher-logits": "test_distill.py::test_distill_recipe_exports_and_quantizes_the_student",
    "distill": "test_distill.py::test_distill_recipe_exports_and_quantizes_the_student",
    "llm-peer": "test_llm_peers.py::test_peer_rows_are_built_measured_and_compared_never_shipped",
    **{
        stage: "test_llm_pipeline.py::test_generation_recipe_runs_end_to_end"
        for stage in (
            "llm-base",
            "llm-finetune",
            "llm-export",
            "llm-quantize",
            "llm-evaluate",
            "llm-bench",
            "llm-bundle",
        )
    },
    **{
        stage: "test_embedding.py::test_the_embedder_runs_end_to_end_with_pooling_in_the_graph"
        for stage in ("embed-finetune", "embed-export", "embed-evaluate", "embed-bundle")
    },
    "embed-distill": "test_embedding.py::test_a_distilled_student_embedder_is_built_measured_and_shipped",
    **{
        stage: "test_tagging.py::test_the_tagger_runs_end_to_end"
        for stage in ("tag-finetune", "tag-export", "tag-evaluate", "tag-bundle")
    },
    **{
        stage: "test_pairs.py::test_a_cross_encoder_regressor_runs_end_to_end"
        for stage in ("pair-finetune", "pair-evaluate", "pair-bundle")
    },
}


def test_every_registered_stage_is_exercised(first_run) -> None:
    _, _, ctx = first_run
    ran = {r.stage for r in ctx.records} | set(EXERCISED_ELSEWHERE)
    assert set(load_all()) <= ran, f"registered but never run end to end: {set(load_all()) - ran}"


def test_budget_no_variant_meets_fails_with_exit_3_and_the_table(first_run, tmp_path: Path, capsys) -> None:
    from toolchain.cli import main

    recipe_path, runs, _ = first_run
    runs_copy = tmp_path / "runs"
    shutil.copytree(runs, runs_copy)
    code = main(["run", str(recipe_path), "budget.max_latency_ms=0.0001", "--runs", str(runs_copy)])
    err = capsys.readouterr().err
    assert code == 3
    assert "no variant meets the recipe's budget" in err
    for name in ("onnx-fp32", "onnx-fp32-optimized", "onnx-int8-dynamic"):
        assert f"| {name} |" in err and "> budget 0.00 ms" in err
    report = json.loads((runs_copy / "tiny" / "report.json").read_text())
    assert report["shipped"] is None and all(
        v.startswith(("rejected", "baseline", "peer")) for v in report["verdicts"].values()
    )


def test_lora_finetune_merges_into_plain_model(tiny_model: Path, tmp_path: Path, data_root: Path) -> None:
    data = tiny_recipe_dict(tiny_model, name="tiny-lora")
    data["finetune"].update(method="lora", lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]})
    data["data"].update(max_train_rows=200, max_eval_rows=64)
    data["compile"] = {"optimize": False, "quantize": [], "export": {"parity_rows": 16}}
    data["bench"].update(batch_sizes=[1], seq_lens=[16])
    data["budget"] = {"max_accuracy_drop": 0.05, "latency_case": "b1_s16"}
    ctx = engine.run(load_recipe(write_recipe(tmp_path, data)), tmp_path / "runs")
    meta = ctx.artifacts["finetune"].meta
    assert meta["method"] == "lora" and meta["trainable_parameters"] < meta["parameters"] / 2
    config = json.loads(ctx.artifacts["finetune"].file("config.json").read_text())
    assert "adapter_config.json" not in {p.name for p in ctx.artifacts["finetune"].path.iterdir()}
    assert config["model_type"] == "bert"
    assert ctx.artifacts["export"].meta["parity"]["max_abs_diff"] <= 1e-4


def test_run_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    from toolchain.core.lock import run_lock
    from toolchain.errors import ToolchainError

    with run_lock(tmp_path), pytest.raises(ToolchainError, match="in use"), run_lock(tmp_path):
        pass


def test_cli_run_says_each_stage_was_reused(first_run, capsys, caplog) -> None:
    from toolchain.cli import main

    recipe_path, runs, first = first_run
    caplog.set_level("INFO", logger="toolchain")
    assert main(["run", str(recipe_path), "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert f"{len(first.records)} stages ({len(first.records)} reused)" in out
    assert str(runs / "tiny" / "bundle") in out
    reused_lines = [r.getMessage() for r in caplog.records if " reused in " in r.getMessage()]
    assert len(reused_lines) == len(first.records)


def test_cli_force_unknown_stage_is_an_error(first_run, capsys) -> None:
    from toolchain.cli import main

    recipe_path, runs, _ = first_run
    assert main(["run", str(recipe_path), "--runs", str(runs), "--force", "nosuch"]) == 1
    assert "no such stage" in capsys.readouterr().err


def test_force_reruns_the_stage_and_everything_after_it(first_run, tmp_path: Path) -> None:
    recipe_path, runs, _ = first_run
    runs_copy = tmp_path / "runs"
    shutil.copytree(runs, runs_copy)
    ctx = engine.run(load_recipe(recipe_path), runs_copy, force=("quantize",))
    status = {r.key: r.status for r in ctx.records}
    for key in ("finetune", "export", "optimize", "evaluate.pytorch-fp32", "evaluate.onnx-fp32"):
        assert status[key] == "reused", key
    for key in ("quantize.onnx-int8-dynamic", "evaluate.onnx-int8-dynamic", "bench", "bundle"):
        assert status[key] == "rebuilt", key
    report = json.loads((runs_copy / "tiny" / "report.json").read_text())
    assert report["measured_at_commit"] == report["environment"]["git_commit"]


def test_readme_app_runs_on_a_copied_bundle_with_the_runtime_file_alone(first_run, tmp_path: Path) -> None:
    """The README's complete app, verbatim, beside a copy of toolchain/runtime.py (nothing else of the toolchain)."""
    _, runs, ctx = first_run
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme.split("<!-- app:start -->", 1)[1].split("<!-- app:end -->", 1)[0]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    assert 8 <= len([line for line in code.splitlines() if line.strip()]) <= 10
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(code)
    shutil.copy2(PROJECT_ROOT / "toolchain" / "runtime.py", app / "runtime.py")
    bundle = tmp_path / "bundle"
    shutil.copytree(runs / "tiny" / "bundle", bundle)
    texts = ctx.eval.texts[:30]
    out = subprocess.run(
        [sys.executable, "app.py", str(bundle)],
        cwd=app,
        input="\n".join(texts) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    want = json.loads(ctx.artifacts[f"evaluate.{manifest['variant']}"].file("metrics.json").read_text())["predictions"]
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == [manifest["labels"][k] for k in want[:30]]


def test_force_bundle_rebuilds_only_the_bundle(first_run, tmp_path: Path) -> None:
    recipe_path, runs, _ = first_run
    runs_copy = tmp_path / "runs"
    shutil.copytree(runs, runs_copy)
    ctx = engine.run(load_recipe(recipe_path), runs_copy, force=("bundle",))
    status = {r.key: r.status for r in ctx.records}
    assert status.pop("bundle") == "rebuilt"
    assert set(status.values()) == {"reused"}


def test_example_cli_classifies_like_the_pipeline_without_torch(first_run, tmp_path: Path) -> None:
    _, runs, ctx = first_run
    bundle = runs / "tiny" / "bundle"
    shipped = json.loads((bundle / "manifest.json").read_text())["variant"]
    want = json.loads(ctx.artifacts[f"evaluate.{shipped}"].file("metrics.json").read_text())["predictions"]
    texts = ctx.eval.texts[:40]
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["classify.py", {str(bundle)!r}]
        try:
            runpy.run_path({str(PROJECT_ROOT / "examples" / "classify.py")!r}, run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        heavy = sorted(m for m in ("torch", "transformers", "optimum") if m in sys.modules)
        print("HEAVY", heavy, file=sys.stderr)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], input="\n".join(texts) + "\n", capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 40
    labels = ctx.recipe.data.labels
    assert [line.split("\t")[0] for line in lines] == [labels[k] for k in want[:40]]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)
