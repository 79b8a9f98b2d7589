"""What calibration reads from the fused decoder graph: the inputs of named MatMuls over prompts, one run each with
an empty cache (for AWQ's scales, `toolchain.llm.awq`, and GPTQ's second moments, `toolchain.llm.gptq`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def run_activations(
    model_path: Path, prompts: list[list[int]], names: list[str]
) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """Per prompt (one run each, empty cache): (its ids, the inputs of the named MatMuls)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    nodes = {n.name: n for n in model.graph.node}
    tensors = [nodes[n].input[0] for n in names]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors keep their names
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    for ids in prompts:
        feed: dict[str, np.ndarray] = {
            "input_ids": np.array([ids], np.int64),
            "seqlens_k": np.array([len(ids) - 1], np.int32),
            "total_sequence_length": np.array(len(ids), np.int32),
        }
        for p in pasts:
            feed[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)
        yield ids, session.run(tensors, feed)
