"""Activation-aware weight scaling (AWQ, Lin et al. 2023) for the fused decoder graph, before its weights go to 4 bits.

A projection's input channels differ in size by orders of magnitude; round-to-nearest 4-bit weights lose most where
the input is large. Multiplying the weight rows of channel j by s_j and dividing the input by s_j computes the same
function, but moves precision to the channels that matter. The division is folded into what feeds the projection,
so the graph gains no node:

- the merged q/k/v and gate/up projections: into the RMSNorm weight before them (its output feeds only that MatMul);
- down_proj: into the up half of the gate/up projection's columns (down's input is SiLU(gate) * up).

s = mean|x|^alpha per channel (normalised), with alpha per projection chosen on calibration activations to minimise
the error of the projection's output with its weights quantized as onnxruntime's MatMulNBits quantizer does
(symmetric blocks along K, scale = the largest-magnitude weight / -8); then each block's weights are clipped to the
ratio of their largest magnitude that minimises the same error (AWQ's clip search), which the quantizer's scales then
follow. The attention output projection is clipped only (its input comes from grouped-query attention: a scale per
channel would have to be shared by the query heads of a group). The LM head is left as it is: its quantized weights
are the embedding table too, and clipping them cost 1.6 points on SST-2 dev (docs/generation.md).

onnxruntime's own AWQ path (`NVAWQWeightOnlyQuantizer`) needs NVIDIA ModelOpt. onnx-neural-compressor 1.0 has AWQ
(and GPTQ) for ONNX graphs, but folds its scales only into a parent LayerNormalization, SimplifiedLayerNormalization,
MatMul, Gemm, Mul or Conv holding an initializer (`algorithms/weight_only/awq.py`); here the parents are
SkipSimplifiedLayerNormalization (com.microsoft) and an initializer-free Mul, so it would insert a Mul node before
nearly every projection. Its GPTQ had not finished after 20 minutes on this graph; `toolchain.llm.gptq` is the
toolchain's own, run after this scaling when a recipe sets both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import StageError
from toolchain.llm.calibration import run_activations

ALPHAS = np.linspace(0.0, 1.0, 11)
CLIP_RATIOS = np.linspace(1.0, 0.55, 10)
PROJECTIONS = ("attn/qkv_proj", "attn/o_proj", "mlp/gate_up_proj", "mlp/down_proj")
SAMPLE_TOKENS = 512  # calibration rows per projection for the searches (the channel means use every token)


def fake_quant(w: np.ndarray, block_size: int, bits: int = 4) -> np.ndarray:
    """`w` (K, N) through symmetric blockwise quantization along K and back, as MatMulNBits' quantizer rounds it."""
    k, n = w.shape
    blocks = w.reshape(k // block_size, block_size, n)
    at = np.abs(blocks).argmax(axis=1)[:, None, :]
    vmax = np.take_along_axis(blocks, at, axis=1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = vmax / low
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale), low, high)
    return (q * scale).reshape(k, n).astype(np.float32)


def _error(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    return float(np.square(x @ (wq - w)).mean())


def search_scale(x: np.ndarray, mean_abs: np.ndarray, w: np.ndarray, block_size: int) -> tuple[np.ndarray, float]:
    """(s, alpha): the per-channel scale of rows of `w` (K, N) that minimises the quantized output error on `x`
    (T, K); alpha 0 is no scaling."""
    best: tuple[float, np.ndarray, float] | None = None
    base = np.maximum(mean_abs, 1e-8)
    for alpha in ALPHAS:
        s = base**alpha
        s = s / np.sqrt(s.max() * s.min())
        err = _error(x / s, w * s[:, None], fake_quant(w * s[:, None], block_size))
        if best is None or err < best[0]:
            best = (err, s.astype(np.float32), round(float(alpha), 2))
    assert best is not None
    return best[1], best[2]


def search_clip(x: np.ndarray, w: np.ndarray, block_size: int) -> np.ndarray:
    """`w` (K, N) with each block's weights clipped to the ratio of their largest magnitude that minimises that
    block's share of the output error on `x` (T, K)."""
    k, n = w.shape
    g = k // block_size
    xb = x.reshape(x.shape[0], g, block_size).transpose(1, 0, 2)  # (G, T, bs)
    wb = w.reshape(g, block_size, n)
    peak = np.abs(wb).max(axis=1, keepdims=True)  # (G, 1, N)
    best_err = np.full((g, n), np.inf, np.float32)
    best = wb.copy()
    for ratio in CLIP_RATIOS:
        clipped = np.clip(wb, -peak * ratio, peak * ratio)
        wq = fake_quant(clipped.reshape(k, n), block_size).reshape(g, block_size, n)
        err = np.square(np.matmul(xb, wq - wb)).mean(axis=1)  # (G, N)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better[:, None, :], clipped, best)
    return best.reshape(k, n)


class _Fused:
    """The fused graph's projections and what feeds them, by the names `toolchain.llm.fused.build` writes."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.nodes = {n.name: n for n in graph.node}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, int] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        self.layers = sum(1 for name in self.nodes if name.endswith("/attn/qkv_proj/MatMul"))
        if not self.layers:
            raise StageError("llm-quantize", "awq: the graph is not the toolchain's fused decoder graph")
        self.arrays: dict[str, np.ndarray] = {}
        self._np = numpy_helper

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = self._np.to_array(self.inits[name]).astype(np.float32)
        return self.arrays[name]

    def matmul(self, layer: int, what: str) -> Any:
        return self.nodes[f"/model/layers.{layer}/{what}/MatMul"]

    def norm_weight(self, node: Any) -> str:
        """The RMSNorm weight feeding `node` (a MatMul), when the norm's output feeds nothing else."""
        norm = self.producer[node.input[0]]
        if norm.op_type not in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            raise StageError("llm-quantize", f"awq: {node.name}'s input is not an RMSNorm ({norm.op_type})")
        if self.consumers[node.input[0]] != 1:
            raise StageError("llm-quantize", f"awq: {norm.name}'s output feeds more than {node.name}")
        return str(norm.input[1] if norm.op_type == "SimplifiedLayerNormalization" else norm.input[2])

    def save(self, out: Path) -> None:
        import onnx

        for name, value in self.arrays.items():
            self.inits[name].CopyFrom(self._np.from_array(value.astype(np.float32), name))
        onnx.save(self.model, str(out))


def calibration_inputs(
    model_path: Path, prompts: list[list[int]], names: list[str], rows: int = SAMPLE_TOKENS, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per named MatMul, over the prompts' tokens: (mean |input| per channel over every token, `rows` input rows
    drawn at random): memory stays bounded however many prompts calibrate."""
    rng = np.random.default_rng(seed)
    per_prompt = -(-2 * rows // max(len(prompts), 1))  # twice what the sample needs, drawn evenly over the prompts
    sums: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {n: [] for n in names}
    count = 0
    for ids, values in run_activations(model_path, prompts, names):
        count += len(ids)
        pick = rng.choice(len(ids), min(per_prompt, len(ids)), replace=False)
        for n, v in zip(names, values, strict=True):
            x = v.reshape(-1, v.shape[-1])
            sums[n] = sums.get(n, 0) + np.abs(x).sum(axis=0)
            kept[n].append(x[pick])
    out = {}
    for n in names:
        x = np.concatenate(kept[n])
        out[n] = (sums[n] / count, x[rng.choice(len(x), min(rows, len(x)), replace=False)])
    return out


def apply(
    src: Path,
    out: Path,
    prompts: list[list[int]],
    block_size: int,
    clip: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `src` (the fused fp32 graph) with activation-aware scaled (and clipped) weights to `out`; returns the
    alpha chosen per projection (None: clipped only) and the relative output error on the calibration tokens, with
    round-to-nearest and after. The attention output projections are clipped only."""
    import onnx

    fused = _Fused(onnx.load(str(src)))
    every = [fused.matmul(i, w).name for i in range(fused.layers) for w in PROJECTIONS]
    acts = calibration_inputs(src, prompts, every, seed=seed)
    report: dict[str, Any] = {"alpha": {}, "error_rtn": {}, "error_awq": {}}

    def search(node: Any, scaled: bool) -> np.ndarray:
        mean_abs, x = acts[node.name]
        w = fused.array(node.input[1])
        if w.shape[0] % block_size:
            raise StageError(
                "llm-quantize",
                f"awq: {node.name} has {w.shape[0]} input channels, not a multiple of block_size {block_size}; "
                "choose a block_size that divides the model's hidden and intermediate sizes",
            )
        ref = float(np.square(x @ w).mean())
        s, alpha = search_scale(x, mean_abs, w, block_size) if scaled else (np.ones(w.shape[0], np.float32), None)
        new = search_clip(x / s, w * s[:, None], block_size) if clip else w * s[:, None]
        report["alpha"][node.name] = alpha
        report["error_rtn"][node.name] = _error(x, w, fake_quant(w, block_size)) / ref
        report["error_awq"][node.name] = _error(x / s, w * s[:, None], fake_quant(new, block_size)) / ref
        fused.arrays[node.input[1]] = new
        return s

    for layer in range(fused.layers):
        qkv, o, gate_up, down = (fused.matmul(layer, w) for w in PROJECTIONS)
        inter = fused.array(gate_up.input[1]).shape[1] // 2
        for node in (qkv, gate_up):  # 1/s into the RMSNorm weight before them
            gamma = fused.norm_weight(node)
            fused.arrays[gamma] = fused.array(gamma) / search(node, True)
        search(o, False)
        s = search(down, True)  # down's input is SiLU(gate) * up: the up columns take 1/s
        fused.array(gate_up.input[1])[:, inter:] /= s[None, :]
    fused.save(out)
    return report
