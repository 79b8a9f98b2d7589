"""The toolchain's own decoder graph for Llama-family causal LMs, written node by node from the PyTorch weights with
onnxruntime's fused operators, so that it runs fast on plain onnxruntime (Python, Node, mobile):

- attention: one `GroupQueryAttention` per layer (com.microsoft) on the merged q/k/v projection, with the rotary
  embedding inside it (`do_rotary`, cos/sin tables as constants). Its past and present key/values may be one
  preallocated buffer (the runtime binds both to it: a decode step copies no cache); the runtime gives the cache
  length as `seqlens_k` (tokens after this step - 1) and `total_sequence_length`, so there is no attention mask;
- residual + RMSNorm fused (`SkipSimplifiedLayerNormalization`), the first norm `SimplifiedLayerNormalization`;
- q/k/v merged into one MatMul, gate/up into one (split, SiLU, multiply);
- the LM head computes the last position's logits only (the runtime reads nothing else);
- `share_embedding` (after weight quantization) reads the embedding rows from the quantized LM head's weights
  (`GatherBlockQuantized`) when the two are tied, so the table is stored once, quantized.

Inputs: input_ids (B, S) int64, seqlens_k (B) int32, total_sequence_length () int32, past_key_values.{i}.key/value
(B, kv_heads, past or capacity, head_dim). Outputs: logits (B, 1, vocab), present.{i}.key/value. A batch row must
not be padded (one prompt per run for the prompt; decode steps may batch prompts of different lengths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import StageError

SUPPORTED = ("llama", "mistral", "qwen2")  # the block layout written here; others go through optimum's export


def supports(config: Any) -> str | None:
    """None when `build` can write this model's graph, else the reason it cannot."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (the fused graph covers {', '.join(SUPPORTED)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (SiLU only)"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    if kind == "llama" and getattr(config, "attention_bias", False):
        return "attention_bias"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", kind == "mistral"):
        return "sliding-window attention"
    return None


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0]

    def matmul(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """x @ weight.T (weight (out, in) as PyTorch stores it), named `name/MatMul` for the quantizers."""
        y = self.node(
            "MatMul", [x, self.init(f"{name}.weight", weight.T)], [f"{name}/MatMul_output_0"], f"{name}/MatMul"
        )
        if bias is not None:
            y = self.node("Add", [y, self.init(f"{name}.bias", bias)], [f"{name}/Add_output_0"], f"{name}/Add")
        return y


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# long: one function writes the whole graph, in the order a reader follows the model
def build(model: Any, out: Path, max_positions: int = 4096, opset: int = 17) -> dict[str, Any]:
    """Write `model` (a transformers Llama-family causal LM in fp32) as the fused decoder graph into out/model.onnx;
    returns what the graph holds. `max_positions` bounds the rotary tables (the runtime's longest prompt + answer)."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    cfg = model.config
    reason = supports(cfg)
    if reason is not None:
        raise StageError("llm-export", f"the fused decoder graph does not cover this model: {reason}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = float(cfg.rms_norm_eps)
    inner = model.model
    g = _Graph()

    with torch.inference_mode():
        positions = torch.arange(max_positions)[None, :]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)  # (1, P, head_dim), halves repeated
    g.init("cos_cache", _np(cos[0, :, : head_dim // 2]))
    g.init("sin_cache", _np(sin[0, :, : head_dim // 2]))

    embed = _np(inner.embed_tokens.weight)
    x = g.node(
        "Gather",
        [g.init("model.embed_tokens.weight", embed), "input_ids"],
        ["embeddings"],
        "/model/embed_tokens/Gather",
    )
    residual = x
    layers = list(inner.layers)
    norm_in = g.node(
        "SimplifiedLayerNormalization",
        [x, g.init("model.layers.0.input_layernorm.weight", _np(layers[0].input_layernorm.weight))],
        ["/model/layers.0/input_layernorm/output_0"],
        "/model/layers.0/input_layernorm/LayerNorm",
        axis=-1,
        epsilon=eps,
        stash_type=1,
    )
    past_inputs, present_outputs = [], []
    for i, layer in enumerate(layers):
        p = f"/model/layers.{i}"
        att = layer.self_attn
        qkv_w = np.concatenate([_np(att.q_proj.weight), _np(att.k_proj.weight), _np(att.v_proj.weight)])
        qkv_b = None
        if att.q_proj.bias is not None:
            qkv_b = np.concatenate([_np(att.q_proj.bias), _np(att.k_proj.bias), _np(att.v_proj.bias)])
        qkv = g.matmul(norm_in, qkv_w, f"{p}/attn/qkv_proj", qkv_b)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        past_inputs += [past_k, past_v]
        present_outputs += [present_k, present_v]
        attn = g.node(
            "GroupQueryAttention",
            [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            [f"{p}/attn/GroupQueryAttention_output_0", present_k, present_v],
            f"{p}/attn/GroupQueryAttention",
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(head_dim**-0.5),
            local_window_size=-1,
        )
        o = g.matmul(attn, _np(att.o_proj.weight), f"{p}/attn/o_proj")
        norm_out, residual = _skip_norm(
            g, o, residual, _np(layer.post_attention_layernorm.weight), eps, f"{p}/post_attention_layernorm"
        )
        mlp = layer.mlp
        inter = mlp.gate_proj.weight.shape[0]
        gate_up = g.matmul(
            norm_out, np.concatenate([_np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)]), f"{p}/mlp/gate_up_proj"
        )
        split = [f"{p}/mlp/gate", f"{p}/mlp/up"]
        g.node(
            "Split",
            [gate_up, g.init(f"{p}/mlp/split_sizes", np.array([inter, inter], np.int64))],
            split,
            f"{p}/mlp/Split",
            axis=-1,
        )
        sig = g.node("Sigmoid", [split[0]], [f"{p}/mlp/act_fn/Sigmoid_output_0"], f"{p}/mlp/act_fn/Sigmoid")
        silu = g.node("Mul", [split[0], sig], [f"{p}/mlp/act_fn/Mul_output_0"], f"{p}/mlp/act_fn/Mul")
        act = g.node("Mul", [silu, split[1]], [f"{p}/mlp/Mul_output_0"], f"{p}/mlp/Mul")
        down = g.matmul(act, _np(mlp.down_proj.weight), f"{p}/mlp/down_proj")
        last = i == len(layers) - 1
        gamma = inner.norm.weight if last else layers[i + 1].input_layernorm.weight
        where = "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm"
        norm_in, residual = _skip_norm(g, down, residual, _np(gamma), eps, where)

    # the last position only: (B, S, H) -> (B, 1, H)
    starts, ends, axes = (
        g.init(n, np.array([v], np.int64)) for n, v in (("last.starts", -1), ("last.ends", 2**62), ("last.axes", 1))
    )
    final = g.node("Slice", [norm_in, starts, ends, axes], ["/model/last_position"], "/model/last_position/Slice")
    head = model.get_output_embeddings().weight
    g.matmul(final, _np(head), "/lm_head")
    g.nodes[-1].output[0] = "logits"

    vocab = int(head.shape[0])
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", head_dim])
        for n in past_inputs
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, vocab])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", head_dim])
        for n in present_outputs
    ]
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
        producer_name="toolchain.llm.fused",
    )
    onnx_model.ir_version = 8
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    onnx.save(onnx_model, str(path))
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and head.data_ptr() == inner.embed_tokens.weight.data_ptr()
    return {
        "graph": "fused",
        "layers": len(layers),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": vocab,
        "max_positions": max_positions,
        "tied_embeddings": tied,
        "ops": _op_counts(onnx_model),
    }


def _skip_norm(g: _Graph, x: str, residual: str, gamma: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """(RMSNorm(x + residual) * gamma, x + residual): onnxruntime's SkipSimplifiedLayerNormalization."""
    outs = [f"{name}/output_0", "", "", f"{name}/residual_0"]
    g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, g.init(f"{name}.weight", gamma)],
        outs,
        f"{name}/SkipLayerNorm",
        domain="com.microsoft",
        epsilon=eps,
    )
    return outs[0], outs[3]


def _op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def is_fused(path: Path) -> bool:
    import onnx

    return any(i.name == "seqlens_k" for i in onnx.load(str(path), load_external_data=False).graph.input)


def share_embedding(src: Path, out: Path) -> bool:
    """When the LM head is a MatMulNBits of the embedding table's values (tied weights, quantized), read the
    embedding rows from the head's quantized weights with GatherBlockQuantized and drop the float table: one copy,
    quantized. Returns whether the graph changed (written to `out` either way)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gather = next((n for n in graph.node if n.name == "/model/embed_tokens/Gather"), None)
    head = next((n for n in graph.node if n.name.startswith("/lm_head/") and n.op_type == "MatMulNBits"), None)
    if gather is None or head is None or (len(head.input) > 3 and head.input[3]):
        onnx.save(model, str(out))
        return False  # nothing to share (head kept in float) or zero points (GatherBlockQuantized's differ)
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    table = numpy_helper.to_array(inits[gather.input[0]])
    if attrs["N"] != table.shape[0] or attrs["K"] != table.shape[1]:
        onnx.save(model, str(out))
        return False
    scales = numpy_helper.to_array(inits[head.input[2]])
    # (N, k_blocks) -> (N, k_blocks, 1): the scales' rank must be the packed weights' rank
    scales_name = head.input[2] + ".for_gather"
    graph.initializer.append(numpy_helper.from_array(scales[:, :, None], scales_name))
    shape_name = "/model/embed_tokens/shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, attrs["K"]], np.int64), shape_name))
    blocks = "/model/embed_tokens/blocks"
    new = [
        helper.make_node(
            "GatherBlockQuantized",
            [head.input[1], gather.input[1], scales_name],
            [blocks],
            name="/model/embed_tokens/GatherBlockQuantized",
            domain="com.microsoft",
            bits=attrs["bits"],
            block_size=attrs["block_size"],
            gather_axis=0,
            quantize_axis=2,
        ),
        helper.make_node("Reshape", [blocks, shape_name], [gather.output[0]], name="/model/embed_tokens/Reshape"),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, n in enumerate(new):
        graph.node.insert(at + k, n)
    graph.initializer.remove(inits[gather.input[0]])
    onnx.save(model, str(out))
    return True
