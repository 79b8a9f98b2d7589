"""Distillation on the tiny model: the student's layers, its losses, and the pipeline path through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_recipe_dict, write_recipe

from toolchain import engine
from toolchain.compile.distill import build_student, make_loss
from toolchain.errors import StageError
from toolchain.recipe.load import load_recipe
from toolchain.recipe.schema import DistillSection


def teacher(tiny_model: Path, eager: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2, **kwargs).eval()


def test_student_keeps_the_requested_teacher_layers(tiny_model: Path) -> None:
    t = teacher(tiny_model)
    s = build_student(t, [1])
    assert s.config.num_hidden_layers == 1 and len(s.bert.encoder.layer) == 1
    assert t.config.num_hidden_layers == 2  # the teacher is untouched
    for (name, a), b in zip(
        s.bert.encoder.layer[0].state_dict().items(), t.bert.encoder.layer[1].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(s.classifier.weight, t.classifier.weight)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    assert s(input_ids=ids).logits.shape == (1, 2)
    with pytest.raises(StageError, match=r"layers 0\.\.1 only"):
        build_student(t, [0, 2])


def test_kept_layers_spread_evenly_and_end_at_the_last() -> None:
    assert DistillSection(num_layers=3).kept_layers(6) == [1, 3, 5]
    assert DistillSection(num_layers=2).kept_layers(12) == [5, 11]
    assert DistillSection(layers=[0, 2, 4]).kept_layers(6) == [0, 2, 4]
    with pytest.raises(ValueError, match="exactly one"):
        DistillSection(layers=[0], num_layers=1)


def test_every_loss_term_is_finite_and_trains_only_the_student(tiny_model: Path) -> None:
    t = teacher(tiny_model, eager=True).requires_grad_(False)
    s = build_student(t, [1]).train()
    cfg = DistillSection(layers=[1], alpha=0.7, hidden_weight=1.0, attention_weight=1.0)
    batch = {
        "input_ids": torch.tensor([[101, 2023, 2003, 1037, 102], [101, 2204, 102, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    }
    with torch.no_grad():
        t_logits = t(**batch).logits
    with pytest.raises(ValueError, match="online"):  # the online teacher's logits are the soft targets
        make_loss(cfg, [1], t_logits, torch.tensor([1, 0]), t)
    loss_fn = make_loss(cfg, [1], None, torch.tensor([1, 0]), t)
    loss = loss_fn(s, batch, [0, 1])
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert s.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # logit-only distillation of a student that equals its teacher has nothing left to learn from the teacher
    same = make_loss(DistillSection(layers=[0, 1], alpha=1.0), [0, 1], t_logits, torch.tensor([1, 0]), None)
    assert same(build_student(t, [0, 1]).eval(), batch, [0, 1]).item() == pytest.approx(0.0, abs=1e-5)


def test_distill_recipe_exports_and_quantizes_the_student(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_recipe_dict(tiny_model, name="distilled")
    data["data"].update(max_train_rows=800, max_eval_rows=100)
    data["compile"]["distill"] = {
        "num_layers": 1,
        "intermediate_size": 24,
        "epochs": 3,
        "lr": 3.0e-3,
        "precision": "fp32",
        "hidden_weight": 0.5,
        "attention_weight": 0.5,
    }
    data["bench"].update(batch_sizes=[1], seq_lens=[32])
    data["budget"].update(max_accuracy_drop=0.5)
    runs = tmp_path / "runs"
    recipe_file = write_recipe(tmp_path, data)
    ctx = engine.run(load_recipe(recipe_file), runs)

    student = ctx.artifacts["distill"]
    config = json.loads(student.file("config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 24  # FFN pruned from 64
    assert student.meta["kept_layers"] == [1] and student.meta["teacher_layers"] == 2
    curve = json.loads(student.file("train_log.json").read_text())["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]  # the student learns
    # the teacher ran beside the student (hidden and attention transfer): its logits came from there
    assert "teacher-logits" not in ctx.artifacts
    # the exported graph is the student's: one attention block, where the teacher has two
    ops = [n.op_type for n in onnx.load(str(ctx.artifacts["optimize"].file("model.onnx"))).graph.node]
    assert ops.count("Attention") == 1
    # the peers are built from the reference's (the teacher's) weights: its own export, two attention blocks
    teacher_graph = onnx.load(str(ctx.artifacts["export.teacher"].file("model.onnx"))).graph
    assert sum(n.op_type == "Softmax" for n in teacher_graph.node) == 2
    report = json.loads((runs / "distilled" / "report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    assert rows["openvino-bf16"]["artifact"] == ctx.artifacts["export.teacher"].id
    calls = {call.key: call for call, _ in engine.planned_ids(ctx)}
    assert calls["optimum-baseline"].inputs == ("finetune", "export.teacher")
    assert calls["openvino-nncf-baseline"].inputs == ("export.teacher", "finetune")
    names = [v["name"] for v in report["variants"]]
    assert names[:3] == ["pytorch-fp32", "pytorch-fp32-student", "onnx-fp32"]
    assert rows["pytorch-fp32-student"]["accuracy"] == rows["onnx-fp32"]["accuracy"]  # the ONNX variants: the student
    assert report["distill"]["kept_layers"] == [1]
    md = (runs / "distilled" / "report.md").read_text()
    assert "1-layer student" in md and "the teacher's weights" in md

    # Logit-only distillation reads the teacher's logits, computed once; a new temperature retrains the student and
    # reuses them.
    data["compile"]["distill"].update(hidden_weight=0.0, attention_weight=0.0)
    data["compile"]["distill"].pop("intermediate_size")
    ctx2 = engine.run(load_recipe(write_recipe(tmp_path, data)), runs)
    assert {r.key: r.status for r in ctx2.records}["teacher-logits"] == "ran"
    data["compile"]["distill"]["temperature"] = 4.0
    ctx3 = engine.run(load_recipe(write_recipe(tmp_path, data)), runs)
    status = {r.key: r.status for r in ctx3.records}
    assert status["finetune"] == status["teacher-logits"] == "reused"
    assert status["distill"] == "ran"
    logits = np.load(ctx3.artifacts["teacher-logits"].file("teacher_logits.npy"))
    assert logits.shape == (800, 2)
