"""The quantize stage, one variant per recipe entry.

- static-int8: onnxruntime's static QDQ quantization, activation ranges calibrated on training rows.
- int4: onnxruntime's MatMulNBits weight-only quantization (block-wise 4-bit weights, float activations).
- dynamic-int8: onnxruntime's dynamic quantization of the (fused) fp32 graph: int8 weights, activation ranges
  computed at run time.
- fp16: the fused graph converted to half precision, inputs and outputs unchanged.
- qat-qdq: the graph exported from quantization-aware training, with the learned scales kept as they are
  (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels). It is never re-quantized.

With `sensitivity: true` or `exclude: auto` the stage also ranks the quantized nodes by their own contribution to
the output error and keeps the worst in float until an accuracy target is met (toolchain.compile.sensitivity).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from pydantic import BaseModel, ConfigDict

from toolchain import model_inputs
from toolchain.compile.graph import approximate_gelu, matmul_nbits
from toolchain.compile.parity import compare
from toolchain.compile.sensitivity import Candidate, auto_exclude, rank_nodes
from toolchain.core.artifact import Artifact
from toolchain.core.context import StageContext
from toolchain.data import Split, read_split
from toolchain.errors import StageError
from toolchain.finetune import qat
from toolchain.finetune.methods import QAT_STATE
from toolchain.recipe.schema import ExportSection, FinetuneSection, QuantizeSpec, ValidationSection
from toolchain.runtime import OnnxClassifier, TextEncoder

log = logging.getLogger("toolchain")


class Selection(BaseModel):
    """What ranking nodes and `exclude: auto` depend on: the rows they read and the budget they aim at."""

    validation: ValidationSection | None
    auto_file_sha256: str | None
    batch_size: int  # evaluation batch size, as the report's accuracy is measured
    max_accuracy_drop: float


class QuantizeConfig(QuantizeSpec):
    """One `compile.quantize` entry, with what building it reads from elsewhere in the recipe: the label columns, the
    bundle's max_length, the export settings (QAT re-exports), the seed (calibration and selection samples), the
    selection settings (ranking) and the fine-tuning settings (QAT rebuilds its fake-quant model)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    text: str
    label: str
    labels: list[str]
    max_length: int
    export: ExportSection
    seed: int
    selection: Selection | None = None
    finetune: FinetuneSection | None = None


class _CalibrationRows(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over real training rows, one row per call, all padded to one length
    (the calibrators stack activations across calls, so shapes must agree)."""

    def __init__(self, tokenizer: Path, texts: list[str], length: int, input_names: list[str]):

        encoder = TextEncoder(tokenizer, length, fields=model_inputs.ENCODING_FIELD)
        self.rows = []
        for text in texts:
            feeds = encoder.encode([text])
            pad = length - feeds["input_ids"].shape[1]
            self.rows.append(
                {
                    k: np.pad(v, ((0, 0), (0, pad)), constant_values=encoder.pad_id if k == "input_ids" else 0)
                    for k, v in feeds.items()
                    if k in input_names
                }
            )
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.rows):
            return None
        self.position += 1
        return self.rows[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def _initializer_inputs(graph: Any) -> dict[str, int]:
    """Node name -> how many of its inputs are initializers (weights)."""
    inits = {i.name for i in graph.initializer}
    return {n.name: sum(x in inits for x in n.input) for n in graph.node}


class Quantizer:
    """Builds one variant's model from a float graph; `only`/`exclude` restrict which candidate nodes are quantized
    (what the sensitivity ranking and `exclude: auto` vary). Subclasses wrap one onnxruntime quantizer each."""

    default_op_types: tuple[str, ...] = ("MatMul",)
    needs_weight = True  # candidates are nodes with a weight (initializer) input

    def __init__(self, ctx: StageContext, spec: QuantizeConfig, src: Path, work: Path, tokenizer: Path):
        self.ctx, self.spec, self.src, self.work = ctx, spec, src, work
        self._count = 0

    def candidates(self) -> list[Candidate]:
        import onnx

        graph = onnx.load(str(self.src)).graph
        weights = _initializer_inputs(graph)
        types = set(self.spec.op_types or self.default_op_types)
        return [
            Candidate(n.name, n.op_type)
            for n in graph.node
            if n.op_type in types and (weights[n.name] > 0 or not self.needs_weight)
        ]

    def build(self, out: Path | None = None, only: list[str] | None = None, exclude: list[str] | None = None) -> Path:
        if out is None:
            self._count += 1
            out = self.work / f"try-{self._count}.onnx"
        self._quantize(out, only, exclude or [])
        return out

    def _quantize(self, out: Path, only: list[str] | None, exclude: list[str]) -> None:
        raise NotImplementedError

    def describe(self, model: Path) -> dict[str, Any]:
        return {}


class DynamicInt8(Quantizer):
    """onnxruntime's dynamic quantization: int8 weights, activation ranges computed at run time."""

    @property
    def default_op_types(self) -> tuple[str, ...]:  # type: ignore[override]
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        return tuple(IntegerOpsRegistry)

    def _quantize(self, out: Path, only: list[str] | None, exclude: list[str]) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        spec = self.spec
        quantize_dynamic(
            self.src,
            out,
            per_channel=spec.per_channel,
            reduce_range=spec.reduce_range,
            op_types_to_quantize=spec.op_types,
            nodes_to_quantize=only,
            nodes_to_exclude=exclude,
            weight_type=QuantType.QInt8,
            # The ORT transformer optimizer leaves some weights without a recorded type; without a default the
            # quantizer fails with "Unable to find data type for weight_name".
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )

    def describe(self, model: Path) -> dict[str, Any]:
        import onnx

        graph = onnx.load(str(model)).graph
        quantized = ("MatMulInteger", "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeMatMul")
        return {"quantized_nodes": sum(n.op_type in quantized for n in graph.node)}


class StaticInt8(Quantizer):
    """onnxruntime's static QDQ quantization, activation ranges calibrated once on training rows (the ranges are
    kept in a calibration cache that every later build reuses)."""

    needs_weight = False  # Q@K^T and attention@V have two activation inputs, both quantized

    def __init__(self, ctx: StageContext, spec: QuantizeConfig, src: Path, work: Path, tokenizer: Path):
        import onnx
        from onnxruntime.quantization import quant_pre_process

        super().__init__(ctx, spec, src, work, tokenizer)
        # Shape inference first, or the quantizer cannot type the activations and leaves them in float.
        # skip_symbolic_shape: symbolic inference fails on optimum's export ("Incomplete symbolic shape inference").
        self.prepared = work / "prepared.onnx"
        quant_pre_process(str(src), str(self.prepared), skip_symbolic_shape=True, skip_optimization=False)
        self.src = self.prepared
        names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
        texts = ctx.train.sample(spec.calibration_rows, seed=spec.seed + 1).texts
        self.reader = _CalibrationRows(tokenizer, texts, spec.calibration_length, names)
        self.cache = work / "calibration.json"

    def _quantize(self, out: Path, only: list[str] | None, exclude: list[str]) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        spec = self.spec
        self.reader.rewind()
        quantize_static(
            self.prepared,
            out,
            self.reader,
            quant_format=QuantFormat.QDQ,
            # The default op types ruin BERT-class accuracy (../shared/ENVIRONMENT.md), and the pooler's Gemm has
            # no calibrated input range after the fused graph's Gather: MatMul only unless the recipe says otherwise.
            op_types_to_quantize=list(spec.op_types or self.default_op_types),
            nodes_to_quantize=only,
            nodes_to_exclude=exclude,
            per_channel=spec.per_channel,
            reduce_range=spec.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[spec.calibration_method],
            calibration_cache_path=self.cache,  # calibrated on the first build, reused by the others
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "CalibTensorRangeSymmetric": False},
        )

    def describe(self, model: Path) -> dict[str, Any]:
        return {"calibration_rows": len(self.reader.rows), "calibration_method": self.spec.calibration_method}


class Int4(Quantizer):
    """onnxruntime's MatMulNBits weight-only quantization: block-wise 4-bit weights, float activations."""

    def _quantize(self, out: Path, only: list[str] | None, exclude: list[str]) -> None:
        spec = self.spec
        matmul_nbits(self.src, out, spec.block_size, spec.symmetric, spec.accuracy_level, only, exclude)

    def describe(self, model: Path) -> dict[str, Any]:
        import onnx

        nodes = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(model)).graph.node)
        return {"matmul_nbits": nodes, "block_size": self.spec.block_size, "accuracy_level": self.spec.accuracy_level}


class Fp16(Quantizer):
    """The fused graph in half precision (onnxruntime.transformers' converter); inputs and outputs keep their types,
    so the bundle's interface does not change."""

    def candidates(self) -> list[Candidate]:
        return []

    def _quantize(self, out: Path, only: list[str] | None, exclude: list[str]) -> None:
        import onnx
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = OnnxModel(onnx.load(str(self.src)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(out))

    def describe(self, model: Path) -> dict[str, Any]:
        import onnx

        graph = onnx.load(str(model)).graph
        fp16 = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
        return {"fp16_initializers": fp16, "initializers": len(graph.initializer)}


QUANTIZERS: dict[str, type[Quantizer]] = {
    "dynamic-int8": DynamicInt8,
    "static-int8": StaticInt8,
    "int4": Int4,
    "fp16": Fp16,
}


def _selection_rows(ctx: StageContext, spec: QuantizeConfig, selection: Selection) -> tuple[Split, str]:
    """Labelled rows for ranking and `exclude: auto`: `auto_file`, else the validation rows, else training rows (the
    calibration sample uses another seed)."""

    if spec.auto_file is not None:
        assert selection.auto_file_sha256 is not None
        path = ctx.data_file(spec.auto_file, selection.auto_file_sha256)
        rows = read_split(path, spec.text, spec.label, spec.labels)
        return rows.head(spec.auto_rows), f"{spec.auto_file} (first rows)"
    if selection.validation is not None:
        validation = ctx.validation
        assert validation is not None
        return validation.head(spec.auto_rows), f"{selection.validation.file} (first rows)"
    return ctx.train.sample(spec.auto_rows, seed=spec.seed + 2), "training rows (sample)"


# long: the build, the node ranking and `exclude: auto` share one scratch folder and one scoring function
def build_variant(ctx: StageContext, spec: QuantizeConfig, src: Path, out: Path, tokenizer: Path) -> dict[str, Any]:
    """Build the variant's model into out/model.onnx; rank the nodes and choose exclusions when the spec asks."""

    max_length = spec.max_length
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        meta: dict[str, Any] = {}
        if spec.gelu_approximation:  # the float graph every build and the ranking's reference start from
            src, meta["gelu_approximated"] = approximate_gelu(src, Path(tmp) / "gelu-tanh.onnx")
        quantizer = QUANTIZERS[spec.mode](ctx, spec, src, Path(tmp), tokenizer)
        final = out / "model.onnx"
        exclude = spec.exclude if isinstance(spec.exclude, list) else []
        unknown = sorted(set(exclude) - {c.name for c in quantizer.candidates()})
        if unknown:
            raise StageError(
                "quantize",
                f"{spec.variant_name}: exclude names nodes this graph has no quantizable node called: {unknown}; "
                "set sensitivity: true and take the names from the report's sensitivity table",
            )
        if spec.ranks_nodes:
            selection = spec.selection
            assert selection is not None  # planned with the recipe's selection settings
            batch_size = selection.batch_size
            rows, where = _selection_rows(ctx, spec, selection)

            def logits(model: Path, texts: list[str]) -> np.ndarray:
                clf = OnnxClassifier(
                    model, tokenizer, max_length, threads=ctx.threads, fields=model_inputs.ENCODING_FIELD
                )
                result = clf.logits(texts, batch_size)
                if model.parent == Path(tmp) and model.name.startswith("try-"):
                    model.unlink()  # keep the scratch folder small: one model at a time
                return result

            quantizer.build(only=[])  # calibrates (static) before the one-node builds reuse the ranges
            probe = rows.texts[: spec.sensitivity_rows]
            reference = logits(quantizer.src, probe)
            candidates = quantizer.candidates()
            log.info("quantize: ranking %d nodes by sensitivity on %d rows", len(candidates), len(probe))
            ranking = rank_nodes(candidates, quantizer.build, lambda m: logits(m, probe), reference)
            (out / "sensitivity.json").write_text(json.dumps(ranking, indent=1))
            meta["sensitivity"] = {"rows": len(probe), "rows_from": where, "nodes": len(ranking), "worst": ranking[:15]}
            if spec.exclude == "auto":
                target = spec.auto_target_drop if spec.auto_target_drop is not None else selection.max_accuracy_drop / 2
                float_logits = logits(quantizer.src, rows.texts)
                float_pred = float_logits.argmax(-1)
                fp32_accuracy = float((float_pred == rows.labels).mean())

                def measure(model: Path) -> dict[str, float]:
                    pred = logits(model, rows.texts).argmax(-1)
                    accuracy = float((pred == rows.labels).mean())
                    return {
                        "flip_rate": float((pred != float_pred).mean()),
                        "accuracy": accuracy,
                        "drop": fp32_accuracy - accuracy,
                    }

                exclude, tries = auto_exclude(ranking, quantizer.build, measure, target, key="flip_rate")
                meta["auto"] = {
                    "rows": len(rows),
                    "rows_from": where,
                    "target_flip_rate": target,
                    "fp32_accuracy": fp32_accuracy,
                    "tries": tries,
                }
                log.info("quantize: exclude auto keeps %d of %d nodes in float", len(exclude), len(ranking))
        quantizer.build(final, exclude=exclude)
        meta["excluded"] = exclude
        meta.update(quantizer.describe(final))
    return meta


def qat_variant(ctx: StageContext, spec: QuantizeConfig, finetune: Artifact, out: Path) -> dict[str, Any]:
    """Rebuild the fake-quant model from the finetune artifact, export its Q/DQ graph, check it against PyTorch."""
    from safetensors.torch import load_file

    cfg = spec.finetune
    assert cfg is not None and cfg.qat is not None  # planned with the recipe's fine-tuning settings
    model = qat.load(finetune.path, spec.labels, cfg)
    missing, unexpected = model.load_state_dict(load_file(str(finetune.file(QAT_STATE))), strict=False)
    if missing or unexpected:
        raise StageError(
            "quantize", f"QAT state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    feeds = TextEncoder(finetune.file("tokenizer.json"), spec.max_length, fields=model_inputs.ENCODING_FIELD).encode(
        ctx.eval.texts[: spec.export.parity_rows]
    )
    qat.export_qdq(model, out, {**feeds, "max_length": spec.max_length}, spec.export.opset)
    (out / qat.QDQ_MODEL).rename(out / "model.onnx")
    folded = qat.fold_weight_quantization(out / "model.onnx")
    parity = compare(out / "model.onnx", finetune.file("tokenizer.json"), out / qat.QDQ_REFERENCE, ctx.threads)
    log.info(
        "quantize: QAT Q/DQ graph vs PyTorch fake-quant on %d eval rows: max |diff| %.3e (tolerance %.0e), "
        "argmax agreement %.4f",
        parity["rows"],
        parity["max_abs_diff"],
        spec.atol,
        parity["argmax_agreement"],
    )
    if not parity["max_abs_diff"] <= spec.atol:
        raise StageError(
            "quantize",
            f"the QAT ONNX graph differs from the PyTorch fake-quant model by "
            f"{parity['max_abs_diff']:.3e}, more than compile.quantize[].atol={spec.atol}",
        )
    return {"parity_vs_fake_quant": parity, "atol": spec.atol, "int8_weights": folded}
