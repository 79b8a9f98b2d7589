"""Error-compensating 4-bit weights (GPTQ, Frantar et al. 2022) for the fused decoder graph's projections, written
straight as onnxruntime MatMulNBits nodes.

Round-to-nearest quantizes each weight alone. GPTQ quantizes the input channels of a projection one at a time and
spreads each one's rounding error over the channels not yet quantized, weighted by the inverse of the calibration
inputs' second moment H = X^T X, so that the output X @ W moves least. Channels go in order of decreasing H diagonal
(act-order); each block's scale is fixed before it starts (static groups, from the weights as given: after AWQ's
clipping, the clipped ones), so that blocks stay contiguous runs of K as MatMulNBits stores them.

The codes and scales follow onnxruntime's symmetric MatMulNBits convention (scale = the block's largest-magnitude
weight / -8, codes -8..7 stored + 8, two per byte, low nibble first, no zero points) and are packed here, since
handing the dequantized weights to onnxruntime's quantizer would round them again with scales of its own.

onnxruntime 1.32 ships a GPTQ (`GPTQWeightOnlyQuantConfig`, vendored from Intel Neural Compressor, the same code as
onnx-neural-compressor's). It is not used here: it runs the whole model over every calibration input once per
distinct MatMul input (121 here: 24,200 runs for 200 prompts; onnx-neural-compressor's copy had not finished after
20 minutes on this graph), its symmetric scale is 2 max|w| / 15 rather than the C++ quantizer's, and it rounds the
GPTQ result again with scales computed from it, stored as unsigned codes with zero points (which
`fused.share_embedding` does not take).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import StageError
from toolchain.llm.calibration import run_activations

DAMP = 0.01  # of the mean H diagonal, added to it: keeps the inverse defined for channels the calibration never moves
COLUMNS = 128  # channels updated together (the lazy batch of the paper); any size: the scales are fixed beforehand


def block_scales(w: np.ndarray, block_size: int) -> np.ndarray:
    """(K / block_size, N): each block's largest-magnitude weight (with its sign) / -8, as onnxruntime rounds."""
    k, n = w.shape
    blocks = w.reshape(k // block_size, block_size, n)
    at = np.abs(blocks).argmax(axis=1)[:, None, :]
    scale = np.take_along_axis(blocks, at, axis=1)[:, 0, :] / -8.0
    scale[scale == 0] = 1.0
    return scale.astype(np.float32)


def quantize(
    w: np.ndarray, h: np.ndarray, block_size: int, actorder: bool = True, damp: float = DAMP
) -> tuple[np.ndarray, np.ndarray]:
    """(codes (K, N) int8 in -8..7, scales (K / block_size, N)) for `w` (K, N) given H (K, K) of its inputs."""
    k, n = w.shape
    if k % block_size:
        raise StageError("llm-quantize", f"gptq: K={k} is not a multiple of block_size {block_size}")
    scales = block_scales(w, block_size)
    col_scale = np.repeat(scales, block_size, axis=0)  # (K, N): the scale of each weight's block
    h = h.astype(np.float64).copy()
    work = w.astype(np.float32).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if actorder else np.arange(k)
    work, col_scale, h = work[order], col_scale[order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # the upper Cholesky factor of H^-1: row i holds how channel i's error moves the channels after it
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    codes = np.zeros((k, n), np.int8)
    for start in range(0, k, COLUMNS):
        end = min(start + COLUMNS, k)
        block = work[start:end]
        errors = np.zeros_like(block)
        for i in range(end - start):
            row, scale = block[i], col_scale[start + i]
            q = np.clip(np.rint(row / scale), -8, 7)
            codes[start + i] = q
            err = (row - q * scale) / hinv[start + i, start + i]
            block[i:] -= np.outer(hinv[start + i, start + i : end], err)
            errors[i] = err
        work[end:] -= hinv[start:end, end:].T @ errors
    restore = np.empty(k, np.int64)
    restore[order] = np.arange(k)
    return codes[restore], scales


def hessians(model_path: Path, prompts: list[list[int]], names: list[str]) -> dict[str, np.ndarray]:
    """Per named MatMul, X^T X / tokens over the prompts' tokens (one prompt per run, empty cache)."""
    sums: dict[str, np.ndarray] = {}
    count = 0
    for ids, values in run_activations(model_path, prompts, names):
        count += len(ids)
        for name, v in zip(names, values, strict=True):
            x = v.reshape(-1, v.shape[-1])
            sums[name] = sums.get(name, 0) + (x.T @ x).astype(np.float64)  # float32 products, float64 sums
    return {name: s / max(count, 1) for name, s in sums.items()}


def pack(codes: np.ndarray, block_size: int) -> np.ndarray:
    """(N, K / block_size, block_size / 2) uint8: MatMulNBits' 4-bit layout of `codes` (K, N)."""
    k, n = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8).T.reshape(n, k // block_size, block_size)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def to_matmul_nbits(
    model: Any, node: Any, codes: np.ndarray, scales: np.ndarray, block_size: int, level: int | None
) -> None:
    """Replace the MatMul `node` of `model` (its weight initializer dropped) by a 4-bit MatMulNBits of `codes`."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weight = node.input[1]
    k, n = codes.shape
    graph.initializer.extend(
        [
            numpy_helper.from_array(pack(codes, block_size), f"{weight}_Q4"),
            numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{weight}_scales"),
        ]
    )
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": 4, "block_size": block_size}
    if level is not None:
        attrs["accuracy_level"] = level
    new = helper.make_node(
        "MatMulNBits",
        [node.input[0], f"{weight}_Q4", f"{weight}_scales"],
        list(node.output),
        name=node.name + "_Q4",
        domain="com.microsoft",
        **attrs,
    )
    at = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(at, new)
    if not any(weight in n.input for n in graph.node):
        graph.initializer.remove(next(i for i in graph.initializer if i.name == weight))


def relative_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """How far X @ wq is from X @ w, relative to X @ w, for inputs X with X^T X / tokens = h."""
    delta = (wq - w).astype(np.float64)
    return float(np.sum(delta * (h @ delta)) / np.sum(w * (h @ w)))


def apply(
    src: Path, out: Path, prompts: list[list[int]], block_size: int, level: int | None, skip: set[str]
) -> dict[str, dict[str, float]]:
    """Write `src` with every float MatMul of the decoder layers (not in `skip`) as a GPTQ 4-bit MatMulNBits to
    `out`; returns each one's relative output error on the calibration inputs, rounded to nearest and GPTQ's."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    todo = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name.startswith("/model/layers.") and n.input[1] in inits and n.name not in skip
    ]
    if not todo:
        raise StageError("llm-quantize", f"gptq: {src.name} has no float projection in its decoder layers to quantize")
    h = hessians(src, prompts, [n.name for n in todo])
    errors = {}
    for node in todo:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if w.shape[0] % block_size:
            raise StageError(
                "llm-quantize",
                f"gptq: {node.name} has {w.shape[0]} input channels, not a multiple of block_size {block_size}; "
                "choose a block_size that divides the model's hidden and intermediate sizes",
            )
        codes, scales = quantize(w, h[node.name], block_size)
        per_weight = np.repeat(scales, block_size, axis=0)
        nearest = np.clip(np.rint(w / per_weight), -8, 7) * per_weight
        errors[node.name] = {
            "rtn": relative_error(w, nearest, h[node.name]),
            "gptq": relative_error(w, codes * per_weight, h[node.name]),
        }
        to_matmul_nbits(model, node, codes, scales, block_size, level)
    onnx.save(model, str(out))
    return errors
