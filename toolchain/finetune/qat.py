"""Quantization-aware training that exports to real int8: every Linear of the encoder is wrapped in a QuantWrapper
(so its input is fake-quantized too), with per-channel symmetric int8 weights and per-tensor uint8 activations.
The trained model is exported with torch.onnx's TorchScript exporter (dynamo=False): fake-quant modules become
QuantizeLinear/DequantizeLinear pairs that onnxruntime runs with int8 kernels.

Library gap: torchao's QAT does not export Q/DQ graphs and the default x86 qconfig's fused observer does not
export at all (see ../shared/ENVIRONMENT.md), so the wrapping and the qconfig are written here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QuantWrapper,
    disable_observer,
    prepare_qat,
)

from toolchain import model_inputs
from toolchain.models import load_classifier
from toolchain.recipe.schema import FinetuneSection

log = logging.getLogger("toolchain")

QDQ_MODEL = "model_qdq.onnx"
QDQ_REFERENCE = "qat_reference.npz"


def qconfig(momentum: float) -> QConfig:
    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        averaging_constant=momentum,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    weight = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        averaging_constant=momentum,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    return QConfig(activation=activation, weight=weight)


def _linears(model: nn.Module, skip: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and not any(
                full == s or full.endswith("." + s) or f".{s}." in f".{full}." for s in skip
            ):
                found.append((parent, child_name, child))
    return found


def load(src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool) -> nn.Module:
    assert cfg.qat is not None
    # Eager attention: the TorchScript exporter traces it to plain MatMul/Softmax that the Q/DQ pass handles.
    model = load_classifier(src, labels, attn_implementation="eager", **trust)
    wrapped = 0
    for parent, name, linear in _linears(model, cfg.qat.skip_modules):
        w = QuantWrapper(linear)
        w.qconfig = qconfig(cfg.qat.observer_momentum)
        setattr(parent, name, w)
        wrapped += 1
    model.train()  # prepare_qat insists; from_pretrained returns eval mode
    prepare_qat(model, inplace=True)
    for _, _, wrapper in _wrappers(model):
        # prepare_qat also fake-quantizes each Linear's output. An int8 matmul needs only its inputs quantized
        # (onnxruntime then runs MatMulIntegerToFloat with a float output); quantizing the outputs too adds a
        # rounding step that the int8 kernels do not need and cost SST-2 accuracy. Keep the outputs in float.
        wrapper.module.activation_post_process = nn.Identity()
    log.info("finetune: qat wraps %d Linear layers with int8 fake quantization", wrapped)
    return model


def on_step(cfg: FinetuneSection) -> Callable[[nn.Module, int, int], None]:
    """Freeze the observed ranges once `freeze_observers_at` of the steps are done."""
    assert cfg.qat is not None
    fraction = cfg.qat.freeze_observers_at

    def hook(model: nn.Module, step: int, total: int) -> None:
        if fraction < 1.0 and step == max(1, int(fraction * total)):
            model.apply(disable_observer)
            log.info("finetune: qat ranges frozen at step %d of %d", step, total)

    return hook


class _Logits(nn.Module):
    """The model's logits from positional inputs (torch.onnx.export passes them in order): `names`, the text inputs
    its forward takes."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, inputs, strict=True))).logits


def export_qdq(model: nn.Module, out: Path, feeds: dict[str, np.ndarray], opset: int) -> None:
    """Write the Q/DQ ONNX graph and the fake-quant PyTorch logits on `feeds` (the parity reference)."""
    model = model.cpu().eval()
    model.apply(disable_observer)  # freeze the learned ranges
    names = model_inputs.forward_inputs(model)
    wrapper = _Logits(model, names).eval()
    args = tuple(torch.from_numpy(feeds[k]) for k in names)
    with torch.inference_mode():
        logits = wrapper(*args).float().numpy()
    axes = {0: "batch_size", 1: "sequence_length"}
    torch.onnx.export(
        wrapper,
        args,
        str(out / QDQ_MODEL),
        input_names=names,
        output_names=["logits"],
        dynamic_axes={**dict.fromkeys(names, axes), "logits": {0: "batch_size"}},
        opset_version=max(opset, 13),
        dynamo=False,
    )
    np.savez(
        out / QDQ_REFERENCE,
        logits=logits,
        max_length=feeds["max_length"],
        **{k: v for k, v in feeds.items() if k != "max_length"},
    )


def fold_weight_quantization(path: Path) -> int:
    """Store Q/DQ weights as int8: replace each QuantizeLinear of a constant weight by its int8 result.

    Library gap: torch.onnx keeps fake-quantized weights as float + QuantizeLinear, four times the size; ORT folds
    them only in memory at load time. Returns how many weights were folded."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type in ("Constant", "Identity")}

    def value(name: str) -> np.ndarray | None:
        """The constant behind a tensor name (the exporter shares equal constants through Identity nodes)."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = consts.get(name)
        if node is not None and node.op_type == "Identity":
            return value(node.input[0])
        if node is not None:
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    folded = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w, scale, zp = (value(n) for n in node.input[:3])
        if scale is None or zp is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = scale.size
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.int32), info.min, info.max)
        graph.initializer.append(numpy_helper.from_array(q.astype(zp.dtype), node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.save(model, str(path))
    return len(folded)


def finalize(model: nn.Module, src: Path, labels: list[str], cfg: FinetuneSection, **trust: bool) -> nn.Module:
    """The trained float weights as a plain transformers model (the QAT model's own fp32 variant)."""
    for parent, name, child in list(_wrappers(model)):
        inner = child.module
        plain = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None)
        plain.weight.data.copy_(inner.weight.data)
        if inner.bias is not None:
            plain.bias.data.copy_(inner.bias.data)
        setattr(parent, name, plain)
    model.config._attn_implementation = "sdpa"
    return model


def _wrappers(model: nn.Module) -> list[tuple[nn.Module, str, QuantWrapper]]:
    return [(p, n, c) for _, p in model.named_modules() for n, c in p.named_children() if isinstance(c, QuantWrapper)]
