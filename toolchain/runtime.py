"""The light predictor an app embeds: numpy + onnxruntime + tokenizers, never torch or transformers.

    from toolchain.runtime import Predictor
    p = Predictor.load("runs/sst2-minilm/bundle")
    p.predict(["a gorgeous, witty film"])  # [Prediction(label='positive', score=0.98, ...)]

This file imports nothing else from the toolchain, so an app can copy it on its own beside a bundle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

MANIFEST_VERSION = 1


class BundleError(ValueError):
    """The bundle is incomplete or was changed after it was made."""


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # softmax probability of `label`
    scores: dict[str, float]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def make_session(
    model_path: Path | str, threads: int | None = None, providers: list[str] | None = None
) -> ort.InferenceSession:
    """An onnxruntime session with explicit intra-op threads and sequential execution."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path), opts, providers=providers or ["CPUExecutionProvider"])


class TextEncoder:
    """Turns texts into the int64 arrays a BERT-style graph takes, exactly as the training tokenizer does."""

    def __init__(self, tokenizer_file: Path | str, max_length: int):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        self.max_length = max_length
        self.pad_id = self.tokenizer.padding["pad_id"] if self.tokenizer.padding else self._find_pad_id()

    def _find_pad_id(self) -> int:
        for token in ("[PAD]", "<pad>"):
            tid = self.tokenizer.token_to_id(token)
            if tid is not None:
                return tid
        return 0

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """input_ids, attention_mask, token_type_ids: each (B, T) int64, T = longest text in the batch."""
        encs = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
            types[i, :n] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class OnnxClassifier:
    """An ONNX sequence classifier plus its tokenizer: texts in, logits out."""

    def __init__(
        self,
        model_path: Path | str,
        tokenizer_file: Path | str,
        max_length: int,
        threads: int | None = None,
        providers: list[str] | None = None,
    ):
        self.session = make_session(model_path, threads, providers)
        self.encoder = TextEncoder(tokenizer_file, max_length)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits (B, labels) for already-encoded inputs."""
        return self.session.run(None, {k: feeds[k] for k in self.input_names})[0]

    def logits(
        self, texts: list[str], batch_size: int = 1, on_batch: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """Logits (N, labels) in the order of `texts`; batches of similar length to keep padding small.

        `on_batch(rows)` is called after each batch (for progress bars)."""
        order = np.argsort(self.encoder.lengths(texts), kind="stable")
        out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.run(self.encoder.encode([texts[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = batch[j]
            if on_batch is not None:
                on_batch(len(idx))
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Predictor:
    """Loads a bundle (verifying every file's sha256) and classifies texts."""

    def __init__(self, folder: Path, manifest: dict, classifier: OnnxClassifier):
        self.folder = folder
        self.manifest = manifest
        self.classifier = classifier
        self.labels: list[str] = manifest["labels"]

    @classmethod
    def load(
        cls, folder: Path | str, threads: int | None = None, providers: list[str] | None = None, verify: bool = True
    ) -> Predictor:
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{folder}: no manifest.json; this is not a bundle folder")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != MANIFEST_VERSION:
            raise BundleError(
                f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                f"this runtime reads {MANIFEST_VERSION}"
            )
        if verify:
            for name, info in manifest["files"].items():
                p = folder / name
                if not p.is_file():
                    raise BundleError(f"{folder}: {name} is missing")
                if sha256_file(p) != info["sha256"]:
                    raise BundleError(
                        f"{folder}: {name} does not match its sha256 in manifest.json; "
                        "the bundle was changed or damaged: rebuild it"
                    )
        pre = manifest["preprocessing"]
        classifier = OnnxClassifier(
            folder / manifest["model"], folder / pre["tokenizer"], pre["max_length"], threads, providers
        )
        return cls(folder, manifest, classifier)

    def predict(self, texts: list[str], batch_size: int | None = None) -> list[Prediction]:
        """Label and probabilities per text. `batch_size` defaults to the one the bundle's accuracy was measured
        with: a dynamically quantized model's outputs depend slightly on what shares a batch."""
        batch_size = batch_size or self.manifest["preprocessing"].get("batch_size", 1)
        probs = softmax(self.classifier.logits(list(texts), batch_size))
        out = []
        for row in probs:
            k = int(row.argmax())
            out.append(
                Prediction(
                    self.labels[k], float(row[k]), {name: float(p) for name, p in zip(self.labels, row, strict=True)}
                )
            )
        return out
