"""Every fine-tuning method on the tiny model: QAT -> Q/DQ ONNX, QLoRA merge, freezing, validation, precision
checks, and the finetune stage under torchrun with two processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_recipe_dict, write_recipe

from toolchain import engine
from toolchain.compile.graph import matmul_input_sources
from toolchain.core.artifact import Artifact
from toolchain.core.context import RunContext
from toolchain.core.store import run_stage
from toolchain.engine import load_all
from toolchain.errors import RecipeError
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.load import load_recipe
from toolchain.tasks.classification import plan


def small(tiny_model: Path, name: str, **finetune: object) -> dict:
    data = tiny_recipe_dict(tiny_model, name=name)
    data["data"].update(max_train_rows=400, max_eval_rows=64)
    data["finetune"].update(finetune)
    data["compile"] = {"optimize": False, "quantize": [], "export": {"parity_rows": 16}}
    data["bench"].update(batch_sizes=[1], seq_lens=[16])
    data["budget"] = {"max_accuracy_drop": 0.5, "latency_case": "b1_s16"}
    return data


def finetune_only(data: dict, tmp_path: Path) -> Artifact:
    load_all()
    ctx = RunContext(load_recipe(write_recipe(tmp_path, data)), tmp_path / "runs")
    calls, _ = plan(ctx)
    return run_stage(ctx, calls[0])


def test_freeze_keeps_embeddings_and_first_layer(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    art = finetune_only(small(tiny_model, "freeze", freeze={"embeddings": True, "layers": 1}), tmp_path)
    before = load_file(str(tiny_model / "model.safetensors"))
    after = {k.removeprefix("bert."): v for k, v in load_file(str(art.file("model.safetensors"))).items()}
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(
        before["encoder.layer.1.attention.self.query.weight"], after["encoder.layer.1.attention.self.query.weight"]
    )
    assert art.meta["frozen_parameters"] > 0.9 * art.meta["parameters"]  # the vocabulary dominates the tiny model


def test_validation_keeps_the_best_step(tiny_model: Path, tmp_path: Path) -> None:
    data = small(tiny_model, "val", validation={"file": "sst2/heldout.tsv", "every_steps": 3, "max_rows": 100})
    art = finetune_only(data, tmp_path)
    log = json.loads(art.file("train_log.json").read_text())
    accs = [p["accuracy"] for p in log["validation_curve"]]
    assert len(accs) >= 4
    assert log["best_validation_accuracy"] == max(accs)
    assert log["best_step"] == log["validation_curve"][accs.index(max(accs))]["step"]


def test_fp16_training_needs_cuda(tiny_model: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RecipeError, match="fp16 autocast needs a CUDA GPU"):
        load_recipe(write_recipe(tmp_path, small(tiny_model, "fp16", precision="fp16")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA GPU")
def test_fp16_training_runs_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    art = finetune_only(small(tiny_model, "fp16", precision="fp16"), tmp_path)
    assert art.meta["device"] == "cuda:0"
    log = json.loads(art.file("train_log.json").read_text())
    assert all(math.isfinite(x["loss"]) for x in log["loss_curve"])


def test_qat_export_has_qdq_around_every_encoder_linear(tiny_model: Path, tmp_path: Path) -> None:
    import onnx

    data = small(tiny_model, "qat", method="qat", precision="fp32")
    data["compile"]["quantize"] = ["qat-qdq", "dynamic-int8"]
    ctx = engine.run(load_recipe(write_recipe(tmp_path, data)), tmp_path / "runs")
    art = ctx.artifacts["quantize.onnx-int8-qat"]
    assert art.meta["qdq"]["matmuls_with_qdq_weights"] >= 12  # 2 layers x 6 Linear (+ attention matmuls)
    assert art.meta["int8_weights"] == 12  # stored as int8, not float + QuantizeLinear
    assert art.meta["parity_vs_fake_quant"]["max_abs_diff"] <= art.meta["atol"]
    graph = onnx.load(str(art.file("model.onnx"))).graph
    sources = matmul_input_sources(graph)
    linears = {name: s for name, s in sources.items() if "/module/" in name}  # the wrapped encoder Linears
    assert len(linears) == 12
    assert set(linears.values()) == {("DequantizeLinear", "DequantizeLinear")}
    weights = {i.name: i for i in graph.initializer}
    assert sum(w.data_type == onnx.TensorProto.INT8 for w in weights.values()) >= 12
    report = json.loads((tmp_path / "runs" / "qat" / "report.json").read_text())
    names = {v["name"] for v in report["variants"]}
    assert {"onnx-int8-qat", "onnx-int8-dynamic", "pytorch-fp32"} <= names


def test_qlora_merge_reproduces_the_trained_4bit_model(tiny_model: Path) -> None:
    from toolchain.finetune import qlora
    from toolchain.recipe.schema import FinetuneSection

    cfg = FinetuneSection.model_validate(
        {"method": "qlora", "precision": "fp32", "lora": {"r": 4, "alpha": 8}, "qlora": {"compute_dtype": "fp32"}}
    )
    torch.manual_seed(0)
    model = qlora.load(tiny_model, ["negative", "positive"], cfg)
    with torch.no_grad():  # pretend training moved the adapters and the head
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ids = torch.randint(1000, 5000, (3, 12))
    mask = torch.ones_like(ids)

    def logits(m: torch.nn.Module) -> torch.Tensor:  # the 4-bit model sits on the GPU where there is one
        device = next(m.parameters()).device
        return m(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()

    with torch.inference_mode():
        want = logits(model)
    plain = qlora.finalize(model, tiny_model, ["negative", "positive"], cfg).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.inference_mode():
        got = logits(plain)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_qlora_finetune_stage_runs_on_this_machines_device(tiny_model: Path, tmp_path: Path) -> None:
    art = finetune_only(small(tiny_model, "qlora", method="qlora", lora={"r": 4, "alpha": 8}), tmp_path)
    assert art.meta["method"] == "qlora" and art.meta["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    config = json.loads(art.file("config.json").read_text())
    assert "quantization_config" not in config  # the saved model is plain full precision


def test_finetune_under_torchrun_two_processes(tiny_model: Path, tmp_path: Path) -> None:
    data = small(tiny_model, "ddp", checkpoint_every=2)  # checkpoints under DDP: every rank saves its RNG
    # distillation after a distributed fine-tune trains the student on rank 0 alone (the other ranks have stopped)
    data["compile"]["distill"] = {"num_layers": 1, "epochs": 1, "lr": 3.0e-3, "precision": "fp32"}
    recipe = write_recipe(tmp_path, data)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `run --nproc 2` starts the ranks with torch's elastic launcher, as `torchrun --standalone` does
    command = [sys.executable, "-m", "toolchain", "run", str(recipe), "--runs", str(runs), "--nproc", "2"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lineage = json.loads((runs / "ddp" / "lineage.json").read_text())
    meta = lineage["stages"][0]["meta"]
    assert meta["world_size"] == 2 and meta["ranks_agree"] is True
    views = meta["rank_predictions"]
    assert len(views) == 2 and len(views[0]) == 32
    # The saved weights, loaded fresh, predict what every rank's in-memory model predicted.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from toolchain.finetune.train import pad_batch

    folder = Path(lineage["stages"][0]["path"])
    folder = folder if folder.is_absolute() else PROJECT_ROOT / folder
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = load_recipe(recipe).data_root() / "sst2/dev.tsv"
    from toolchain.data import read_split

    rows = read_split(texts, "sentence", "label", ["negative", "positive"]).texts[:32]
    batch = pad_batch(tok(rows, truncation=True, max_length=128)["input_ids"], tok.pad_token_id)
    with torch.inference_mode():
        pred = model(**batch).logits.argmax(-1).tolist()
    assert pred == views[0] == views[1]
    assert np.isfinite(json.loads((runs / "ddp" / "report.json").read_text())["variants"][0]["accuracy"])
    distill = next(s for s in lineage["stages"] if s["key"] == "distill")
    assert distill["meta"]["world_size"] == 1 and distill["meta"]["kept_layers"] == [1]


def test_a_failing_rank_is_one_line_from_every_process(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, small(tiny_model, "ddp", checkpoint_every=2))
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOOLCHAIN_FAULT": "finetune:after-step-3:raise:rank=1"}
    command = [sys.executable, "-m", "toolchain", "run", str(recipe), "--runs", str(runs), "--nproc", "2"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: stage finetune failed unexpectedly: InjectedFault" in out.stderr  # rank 1's own line
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: rank 1 of 2 failed first: stage finetune failed unexpectedly: InjectedFault")
    )
    logs = sorted((runs / "ddp" / "logs").glob("*-rank1.log"))
    assert logs and "Traceback (most recent call last)" in logs[-1].read_text()
    assert not list((runs / "ddp" / "stages").glob("finetune-*/artifact.json"))


class _Stop(Exception):
    """Stands in for Ctrl-C or a kill in the middle of training."""


@pytest.mark.parametrize("method", ["full", "lora", "qat"])
def test_interrupted_training_resumes_from_its_checkpoint_to_the_same_weights(
    tiny_model: Path, tmp_path: Path, method: str
) -> None:
    from transformers import AutoTokenizer

    from toolchain.data import load_validation
    from toolchain.finetune import checkpoint
    from toolchain.finetune.methods import METHODS
    from toolchain.finetune.train import seed_everything, train_classifier

    validation = {"file": "sst2/heldout.tsv", "every_steps": 3, "max_rows": 60}
    data = small(tiny_model, f"ckpt-{method}", method=method, checkpoint_every=4, epochs=1, validation=validation)
    data["data"]["max_train_rows"] = 480  # 15 steps of 32 rows
    recipe = load_recipe(write_recipe(tmp_path, data))
    cfg = recipe.finetune
    ctx = RunContext(recipe, tmp_path / "runs")
    val = load_validation(recipe)
    impl = METHODS[method]

    def train(checkpoints: Path | None, stop_at: int | None = None) -> tuple[torch.nn.Module, dict]:
        seed_everything(cfg.seed)  # what the stage does in a fresh process
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        model = impl.load(tiny_model, recipe.data.labels, cfg)
        hook = impl.on_step(cfg) if hasattr(impl, "on_step") else None

        def on_step(m: torch.nn.Module, done: int, total: int) -> None:
            if hook is not None:
                hook(m, done, total)
            if done == stop_at:
                raise _Stop

        stats = train_classifier(model, tokenizer, ctx.train, cfg, val, on_step=on_step, checkpoints=checkpoints)
        return model, stats

    whole, whole_stats = train(None)
    folder = tmp_path / "checkpoints"
    with pytest.raises(_Stop):
        train(folder, stop_at=10)
    assert checkpoint.latest(folder).name == "step-0000008"  # every 4 steps, the latest kept
    assert [p.name for p in folder.iterdir()] == ["step-0000008"]
    resumed, stats = train(folder)
    assert stats["resumed_from_step"] == 8 and whole_stats["resumed_from_step"] is None
    want, got = whole.state_dict(), resumed.state_dict()
    assert set(want) == set(got)
    for key in want:  # bit for bit: the same dropout masks, batches, optimizer moments and LR schedule
        assert torch.equal(want[key], got[key]), key
    for curve in ("loss_curve", "validation_curve"):
        assert stats[curve] == whole_stats[curve]
    assert stats["best_step"] == whole_stats["best_step"]


def test_a_damaged_checkpoint_is_dropped_and_training_starts_over(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from toolchain.finetune import checkpoint
    from toolchain.finetune.full import load
    from toolchain.finetune.train import seed_everything, train_classifier

    data = small(tiny_model, "ckpt-bad", checkpoint_every=4, epochs=1)
    data["data"]["max_train_rows"] = 320
    recipe = load_recipe(write_recipe(tmp_path, data))
    ctx = RunContext(recipe, tmp_path / "runs")
    folder = tmp_path / "checkpoints"
    runs = []
    for stop_at in (6, None):
        seed_everything(0)
        model = load(tiny_model, recipe.data.labels, recipe.finetune)

        def on_step(m: torch.nn.Module, done: int, total: int, stop: int | None = stop_at) -> None:
            if done == stop:
                raise _Stop

        try:
            runs.append(
                train_classifier(
                    model,
                    AutoTokenizer.from_pretrained(tiny_model),
                    ctx.train,
                    recipe.finetune,
                    on_step=on_step,
                    checkpoints=folder,
                )
            )
        except _Stop:
            latest = checkpoint.latest(folder)
            (latest / "weights.safetensors").write_bytes(b"not a safetensors file")
    assert runs[0]["resumed_from_step"] is None and runs[0]["steps_run"] == 10
