"""The light predictor an app embeds: numpy + onnxruntime + tokenizers, never torch or transformers (a bundle made
for the OpenVINO target: numpy + openvino + tokenizers, and no onnxruntime).

    from toolchain.runtime import Predictor
    p = Predictor.load("runs/sst2-minilm/bundle")
    p.predict(["a gorgeous, witty film"])  # [Prediction(label='positive', score=0.98, ...)]

With `Predictor.load(bundle, in_graph=True)` it runs the strings-in model instead (`bundle.tokenizer: in-graph`):
numpy + onnxruntime + onnxruntime-extensions, no tokenizer library.

This file imports nothing else from the toolchain, so an app can copy it on its own beside a bundle.
"""

# long: what apps copy is one file on purpose (numpy + a runtime + tokenizers, no toolchain import)

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

MANIFEST_VERSION = 2  # 2: each input names the tokenizer field it comes from (`from`)
GENERATOR_MANIFEST_VERSION = 1  # bundles of decoder LMs (manifest kind "generator")
EMBEDDER_MANIFEST_VERSION = 1  # bundles of sentence embedders (manifest kind "embedder")


class BundleError(ValueError):
    """The bundle is incomplete or was changed after it was made."""


def clean_text(text: object, where: str = "text") -> str:
    """A text as the tokenizer can take it: a str (anything else is a TypeError naming `where`), with lone UTF-16
    surrogates (which no UTF-8 text can hold: a broken emoji from a JSON escape, say) replaced by U+FFFD, as Node's
    TextEncoder and the WHATWG encoding standard do."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def clean_texts(texts: object) -> list[str]:
    """`texts` (a list, tuple or other iterable of str; not one str) as a list of clean texts."""
    if isinstance(texts, str | bytes):
        raise TypeError(f"texts must be a list of str, got one {type(texts).__name__}: pass [text]")
    try:
        items = list(texts)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}") from None
    return [clean_text(t, f"texts[{i}]") for i, t in enumerate(items)]


def _shape_buckets(pre: dict, manifest_path: Path) -> list[int]:
    """A manifest's preprocessing.shape_buckets: positive ints ([] when absent)."""
    buckets = pre.get("shape_buckets", [])
    counts = isinstance(buckets, list) and all(type(b) is int and b > 0 for b in buckets)
    if not counts:
        raise BundleError(
            f"{manifest_path}: preprocessing.shape_buckets must be a list of positive token counts, got {buckets!r}; "
            "rebuild the bundle or restore the manifest"
        )
    return buckets


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    return batch_size


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # softmax probability of `label`
    scores: dict[str, float]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# Session config entries for the CPU provider: onnxruntime's CPU SkipLayerNormalization kernel is a scalar loop
# (5.2 ns per element against 0.7 for Add + LayerNormalization, onnxruntime 1.32, 1x128x384), so sessions keep the
# residual Add and LayerNormalization apart instead of fusing them (b1_s128 of a 3-layer MiniLM int8: 3.2 -> 2.7 ms).
# Bundles record it in their manifest (`runtime.cpu_session_config`) for apps to set too (onnxruntime-node: `extra`).
CPU_SESSION_CONFIG = {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"}


def make_session(
    model_path: Path | str,
    threads: int | None = None,
    providers: list[str] | None = None,
    custom_ops: str | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session with explicit intra-op threads and sequential execution; `custom_ops` is the path of a
    custom operator library to register (onnxruntime-extensions' for the strings-in graph). On the CPU provider
    alone, `CPU_SESSION_CONFIG` applies."""
    import onnxruntime as ort  # here, not at the top: an OpenVINO bundle's app does not install it

    opts = session_options(threads, providers, custom_ops)
    return ort.InferenceSession(str(model_path), opts, providers=providers or ["CPUExecutionProvider"])


def session_options(
    threads: int | None = None, providers: list[str] | None = None, custom_ops: str | None = None
) -> ort.SessionOptions:
    """The options `make_session` uses."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if set(providers or ["CPUExecutionProvider"]) == {"CPUExecutionProvider"}:
        for key, value in CPU_SESSION_CONFIG.items():
            opts.add_session_config_entry(key, value)
    if custom_ops:
        opts.register_custom_ops_library(custom_ops)
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class TextEncoder:
    """Turns texts into the int64 arrays a graph takes, exactly as the training tokenizer does. `fields`: each input
    the arrays are for -> the `tokenizers` Encoding field it comes from (a bundle manifest's inputs' `from`; the
    toolchain's own runs pass toolchain.model_inputs.ENCODING_FIELD, every input a text model may take)."""

    def __init__(
        self, tokenizer_file: Path | str, max_length: int, *, fields: dict[str, str], buckets: Sequence[int] = ()
    ):
        from tokenizers import Tokenizer

        self.fields = dict(fields)
        self.buckets = sorted(buckets)  # a batch is padded up to the smallest of these that holds it
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

    def lengths(self, texts: list[Any]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: list[Any]) -> dict[str, np.ndarray]:
        """One (B, T) int64 array per input in `fields`, T = the longest text in the batch, or the smallest of
        `buckets` that holds it; padding positions hold
        the pad id in the ids and 0 elsewhere. A graph is fed the ones it declares. An item may be a pair of texts,
        (text, text_pair): the tokenizer joins them ([CLS] a [SEP] b [SEP], segment ids 0 then 1) and cuts the longer
        first when they pass max_length together."""
        encs = self.tokenizer.encode_batch(texts)
        empty = [i for i, e in enumerate(encs) if not e.ids]
        if empty:  # a tokenizer without [CLS]/[SEP] and a text of nothing but spaces: no input for the graph
            raise ValueError(f"texts {empty[:5]} encode to no tokens; give each text at least one word")
        width = max(len(e.ids) for e in encs)
        width = next((b for b in self.buckets if b >= width), width)
        out = {}
        for name, field in self.fields.items():
            arr = np.full((len(encs), width), self.pad_id if field == "ids" else 0, dtype=np.int64)
            for i, e in enumerate(encs):
                values = getattr(e, field)
                arr[i, : len(values)] = values
            out[name] = arr
        return out


def encode_words(encoder: TextEncoder, sentences: list[list[str]]) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Arrays for sentences given as words (each word tokenized on its own, as `is_pretokenized`), and for each
    sentence the position of each word's first sub-token (-1: the word was cut off at max_length)."""
    encs = encoder.tokenizer.encode_batch(sentences, is_pretokenized=True)
    width = max(len(e.ids) for e in encs)
    out = {}
    for name, field in encoder.fields.items():
        arr = np.full((len(encs), width), encoder.pad_id if field == "ids" else 0, dtype=np.int64)
        for i, e in enumerate(encs):
            values = getattr(e, field)
            arr[i, : len(values)] = values
        out[name] = arr
    firsts = []
    for words, e in zip(sentences, encs, strict=True):
        first = [-1] * len(words)
        for pos, w in enumerate(e.word_ids):
            if w is not None and first[w] < 0:
                first[w] = pos
        firsts.append(first)
    return out, firsts


def bio_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities (type, first word, last word) in a sequence of BIO tags, read as seqeval reads them by default: a
    B- tag starts an entity, an I- tag continues one of its type and otherwise starts one (an I- with no B-)."""
    found: list[tuple[str, int, int]] = []
    current: list[Any] | None = None
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = (tag[0], tag[2:]) if tag != "O" and len(tag) > 2 else ("O", "")
        if current is not None and (prefix in ("O", "B") or kind != current[0]):
            found.append((current[0], current[1], i - 1))
            current = None
        if prefix in ("B", "I") and current is None:
            current = [kind, i]
    return found


@dataclass
class Entity:
    """An entity found in a text: its type, the characters it spans (text[start:end]) and its score (the mean
    probability of its words' tags)."""

    type: str
    start: int
    end: int
    text: str
    score: float


def spans_from_tags(
    text: str, words: list[tuple[str, int, int]], tags: list[str], probs: list[float] | None = None
) -> list[Entity]:
    """Entities with character offsets from one tag per word (`words` as split_words gives them); an entity's score is
    the mean probability of its words' tags."""
    spans = []
    for kind, first, last in bio_entities(tags):
        start, end = words[first][1], words[last][2]
        score = float(np.mean(probs[first : last + 1])) if probs else 1.0
        spans.append(Entity(kind, start, end, text[start:end], round(score, 6)))
    return spans


def split_words(text: str) -> list[tuple[str, int, int]]:
    """The text's words (runs of non-space characters) with their character offsets: what a tagger tags."""
    import re

    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]


class _Classifier:
    """A sequence classifier plus its tokenizer: texts in, logits out. Subclasses run the graph."""

    encoder: TextEncoder
    input_names: list[str]

    def feeds(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays this graph declares, by name; one it declares and the encoder does not make is an error."""
        missing = [n for n in self.input_names if n not in arrays]
        if missing:
            raise BundleError(
                f"the graph takes {self.input_names}; {missing} are not among the inputs the encoder makes "
                f"({sorted(arrays)}): the manifest's inputs must name each with the tokenizer field it comes from"
            )
        return {n: arrays[n] for n in self.input_names}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits (B, labels) for already-encoded inputs."""
        raise NotImplementedError

    def logits(
        self, texts: list[Any], batch_size: int = 1, on_batch: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """Logits (N, labels) in the order of `texts` (texts, or (text, text_pair) pairs); batches of similar length
        to keep padding small.

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


class OnnxClassifier(_Classifier):
    """An ONNX sequence classifier run by onnxruntime."""

    def __init__(
        self,
        model_path: Path | str,
        tokenizer_file: Path | str,
        max_length: int,
        threads: int | None = None,
        providers: list[str] | None = None,
        *,
        fields: dict[str, str],
    ):
        self.session = make_session(model_path, threads, providers)
        self.encoder = TextEncoder(tokenizer_file, max_length, fields=fields)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, self.feeds(feeds))[0]


class OpenVinoClassifier(_Classifier):
    """A sequence classifier run by OpenVINO on the CPU: an ONNX file or an OpenVINO IR (model.xml + model.bin).
    `precision` is OpenVINO's INFERENCE_PRECISION_HINT (f32, bf16: bf16 runs on AMX/AVX512-BF16 CPUs, elsewhere
    OpenVINO keeps f32; None: OpenVINO's default for the CPU); `PERFORMANCE_HINT: LATENCY`, as for one app request
    at a time.

    `buckets` (a bundle's `preprocessing.shape_buckets`): texts are padded up to the smallest of these lengths that
    holds them, and each input shape runs as a model compiled for that static shape at its first use (OpenVINO runs
    a static shape faster than its dynamic-shape model, which also pays whenever the length changes). Empty: one
    dynamic-shape model, each batch at its own length."""

    def __init__(
        self,
        model_path: Path | str,
        tokenizer_file: Path | str,
        max_length: int,
        threads: int | None = None,
        precision: str | None = None,
        *,
        fields: dict[str, str],
        buckets: Sequence[int] = (),
    ):
        import openvino as ov

        self._config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision:
            self._config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        self._core = ov.Core()
        self._model = self._core.read_model(str(model_path))
        self.encoder = TextEncoder(tokenizer_file, max_length, fields=fields, buckets=buckets)
        self.input_names = [i.get_any_name() for i in self._model.inputs]
        self.compiled = self._core.compile_model(self._model, "CPU", self._config) if not buckets else None
        self._static: dict[tuple[int, int], Any] = {}  # (batch, length) -> the model compiled for that shape
        self._lock = threading.Lock()
        self._local = threading.local()  # infer requests per thread: one request is not safe to share

    @property
    def static_shapes(self) -> list[tuple[int, int]]:
        """The (batch, length) shapes compiled so far (none without buckets: one dynamic-shape model)."""
        return sorted(self._static)

    def _compiled_for(self, shape: tuple[int, int]) -> Any:
        if self.compiled is not None:
            return self.compiled
        with self._lock:
            if shape not in self._static:
                model = self._model.clone()
                model.reshape({name: list(shape) for name in self.input_names})
                self._static[shape] = self._core.compile_model(model, "CPU", self._config)
            return self._static[shape]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = self.feeds(feeds)
        shape = next(iter(feeds.values())).shape
        compiled = self._compiled_for((int(shape[0]), int(shape[1])))
        requests = self._local.__dict__.setdefault("requests", {})
        if id(compiled) not in requests:
            requests[id(compiled)] = compiled.create_infer_request()
        return np.asarray(requests[id(compiled)].infer(feeds)[compiled.output(0)])


def openvino_hint(precision: str) -> str | None:
    """OpenVINO's INFERENCE_PRECISION_HINT for a variant's precision: bf16 and fp32 as named, anything else (an
    int8 graph) OpenVINO's own default for this CPU."""
    return {"bf16": "bf16", "fp32": "f32"}.get(precision)


def make_classifier(
    runtime: str,
    model_path: Path | str,
    tokenizer_file: Path | str,
    max_length: int,
    threads: int | None = None,
    providers: list[str] | None = None,
    precision: str | None = None,
    *,
    fields: dict[str, str],
    buckets: Sequence[int] = (),
) -> OnnxClassifier | OpenVinoClassifier:
    """The classifier for a runtime: `onnxruntime` (with its execution providers) or `openvino` (precision hint,
    shape buckets). `fields`: as TextEncoder's."""
    if runtime == "openvino":
        return OpenVinoClassifier(
            model_path, tokenizer_file, max_length, threads, precision, fields=fields, buckets=buckets
        )
    if runtime != "onnxruntime":
        raise BundleError(f"unknown runtime {runtime!r}: onnxruntime or openvino")
    return OnnxClassifier(model_path, tokenizer_file, max_length, threads, providers, fields=fields)


def extensions_library() -> str:
    """The path of onnxruntime-extensions' custom operator library (the strings-in graph's tokenizer).

    Found without importing the package: its __init__ imports torch and transformers when they are installed, which
    an app embedding this runtime should not pay for."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_extensions")
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(
            "the strings-in model (model.strings.onnx) needs onnxruntime-extensions: pip install onnxruntime-extensions"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("_extensions_pydll*"))
        found = [p for p in found if p.suffix in (".so", ".pyd", ".dylib")]
        if found:
            return str(found[0])
    from onnxruntime_extensions import get_library_path  # a layout this code does not know: ask the package

    return get_library_path()


class StringsClassifier:
    """The strings-in graph (`bundle.tokenizer: in-graph`): raw text in, logits/scores/label out, no tokenizer library.
    The graph takes one text per run (its tokenizer op reads a second string as a sentence pair)."""

    def __init__(self, model_path: Path | str, threads: int | None = None, providers: list[str] | None = None):
        self.session = make_session(model_path, threads, providers, custom_ops=extensions_library())
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, text: str) -> dict[str, np.ndarray]:
        """label (string [1]), scores (float [1, L]) and the logits for one text."""
        return dict(zip(self.outputs, self.session.run(None, {"text": np.array([text], dtype=object)}), strict=True))

    def logits(
        self, texts: list[str], batch_size: int = 1, on_batch: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """Logits (N, labels), one run per text (`batch_size` is accepted for OnnxClassifier's signature)."""
        name = self.outputs[2]
        out = []
        for text in texts:
            out.append(self.run(text)[name][0])
            if on_batch is not None:
                on_batch(1)
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_fields(manifest: dict[str, Any], where: Path) -> dict[str, str]:
    """A bundle's model inputs -> the tokenizer Encoding field each comes from (the manifest's inputs' `from`)."""
    fields = {p["name"]: p["from"] for p in manifest.get("inputs", []) if "from" in p}
    if not fields:
        raise BundleError(
            f"{where}: its inputs name no tokenizer field (`from`); rebuild the bundle with this toolchain"
        )
    return fields


class Predictor:
    """Loads a bundle (verifying every file's sha256) and classifies texts."""

    def __init__(self, folder: Path, manifest: dict, classifier: _Classifier | StringsClassifier):
        self.folder = folder
        self.manifest = manifest
        self.classifier = classifier
        self.labels: list[str] = manifest["labels"]

    @classmethod
    def load(
        cls,
        folder: Path | str,
        threads: int | None = None,
        providers: list[str] | None = None,
        verify: bool = True,
        in_graph: bool = False,
    ) -> Predictor:
        """Load a bundle. `in_graph=True` runs its strings-in model (`bundle.tokenizer: in-graph`) with
        onnxruntime-extensions instead of model.onnx with the tokenizers library."""
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{folder}: no manifest.json; this is not a bundle folder")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("kind") == "generator":
            raise BundleError(f"{manifest_path}: a generation bundle (a decoder LM): load it with Generator")
        if manifest.get("kind") == "embedder":
            raise BundleError(f"{manifest_path}: a sentence-embedding bundle: load it with Embedder")
        if manifest.get("kind") == "tagger":
            raise BundleError(f"{manifest_path}: a token-classification bundle: load it with Tagger")
        if manifest.get("kind") == "cross-encoder":
            raise BundleError(f"{manifest_path}: a text-pair bundle: load it with CrossEncoder")
        if manifest.get("format_version") != MANIFEST_VERSION:
            raise BundleError(
                f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                f"this runtime reads {MANIFEST_VERSION}"
            )
        if verify:
            _verify_files(folder, manifest)
        if in_graph:
            strings = manifest.get("strings_model")
            if not strings:
                raise BundleError(
                    f"{manifest_path}: this bundle has no strings-in model; build it with bundle.tokenizer: in-graph"
                )
            return cls(folder, manifest, StringsClassifier(folder / strings["file"], threads, providers))
        pre = manifest["preprocessing"]
        runtime = manifest.get("runtime", {"name": "onnxruntime"})  # bundles before the OpenVINO target: onnxruntime
        classifier = make_classifier(
            runtime["name"],
            folder / manifest["model"],
            folder / pre["tokenizer"],
            pre["max_length"],
            threads,
            providers,
            runtime.get("precision"),
            fields=input_fields(manifest, manifest_path),
            buckets=_shape_buckets(pre, manifest_path),  # OpenVINO bundles: the lengths it was measured at
        )
        return cls(folder, manifest, classifier)

    def predict(self, texts: list[str], batch_size: int | None = None) -> list[Prediction]:
        """Label and probabilities per text, in order. `batch_size` defaults to the one the bundle's accuracy was
        measured with: a dynamically quantized model's outputs depend slightly on what shares a batch.

        A text longer than the bundle's max_length tokens is classified by its first max_length tokens (special
        tokens included); an empty or whitespace-only text is classified like any other; lone surrogates are read
        as U+FFFD. Not a list of str: TypeError; a batch_size below 1: ValueError. Safe to call from several
        threads at once on one Predictor."""
        texts = clean_texts(texts)
        if batch_size is None:
            batch_size = self.manifest["preprocessing"].get("batch_size", 1)
        batch_size = _check_batch_size(batch_size)
        if not texts:
            return []
        probs = softmax(self.classifier.logits(texts, batch_size))
        out = []
        for row in probs:
            k = int(row.argmax())
            out.append(
                Prediction(
                    self.labels[k], float(row[k]), {name: float(p) for name, p in zip(self.labels, row, strict=True)}
                )
            )
        return out


def _open_bundle(
    folder: Path | str, kind: str, version: int, threads: int | None, providers: list[str] | None, verify: bool
) -> tuple[Path, dict, OnnxClassifier]:
    """A bundle of a task other than classification (manifest `kind`): its manifest checked (kind, format version,
    every file's sha256 unless `verify` is off) and its ONNX graph opened with the tokenizer beside it."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: no manifest.json; this is not a bundle folder")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("kind") != kind:
        raise BundleError(
            f"{manifest_path}: a {manifest.get('kind', 'classifier')} bundle; this class loads {kind} bundles"
        )
    if manifest.get("format_version") != version:
        raise BundleError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this runtime reads {version}"
        )
    if verify:
        _verify_files(folder, manifest)
    pre = manifest["preprocessing"]
    model = OnnxClassifier(
        folder / manifest["model"],
        folder / pre["tokenizer"],
        pre["max_length"],
        threads,
        providers,
        fields=input_fields(manifest, manifest_path),
    )
    return folder, manifest, model


class Embedder:
    """Loads a sentence-embedding bundle (verifying every file's sha256) and embeds texts: one L2-normalized float32
    vector per text (pooling and normalization run inside the graph), so a dot product is the cosine similarity.

        e = Embedder.load("runs/stsb-minilm/bundle")
        v = e.embed(["A man is playing a guitar.", "Someone plays guitar."])  # (2, 384) float32
        float(v[0] @ v[1])  # cosine similarity"""

    def __init__(self, folder: Path, manifest: dict, model: OnnxClassifier):
        self.folder = folder
        self.manifest = manifest
        self.model = model
        self.dimension: int = manifest["dimension"]

    @classmethod
    def load(
        cls, folder: Path | str, threads: int | None = None, providers: list[str] | None = None, verify: bool = True
    ) -> Embedder:
        return cls(*_open_bundle(folder, "embedder", EMBEDDER_MANIFEST_VERSION, threads, providers, verify))

    def embed(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """(len(texts), dimension) float32, in order. `batch_size` defaults to the one the bundle was measured with
        (a dynamically quantized graph's outputs depend slightly on what shares a batch). Texts longer than the
        bundle's max_length tokens are embedded by their first max_length tokens. Safe to call from several threads
        at once on one Embedder."""
        texts = clean_texts(texts)
        if batch_size is None:
            batch_size = self.manifest["preprocessing"].get("batch_size", 1)
        batch_size = _check_batch_size(batch_size)
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        return self.model.logits(texts, batch_size)


CROSS_ENCODER_MANIFEST_VERSION = 1  # bundles of cross-encoders on text pairs (manifest kind "cross-encoder")


def clean_pairs(pairs: object) -> list[tuple[str, str]]:
    """`pairs` (a list of (text, text_pair)) as clean text pairs; anything else is a TypeError naming the item."""
    if isinstance(pairs, str | bytes):
        raise TypeError("pairs must be a list of (text, text_pair), got one text")
    out = []
    for i, p in enumerate(list(pairs)):  # type: ignore[call-overload]
        if not isinstance(p, tuple | list) or len(p) != 2:
            raise TypeError(f"pairs[{i}] must be a (text, text_pair) pair, got {type(p).__name__}")
        out.append((clean_text(p[0], f"pairs[{i}][0]"), clean_text(p[1], f"pairs[{i}][1]")))
    return out


class CrossEncoder:
    """Loads a cross-encoder bundle (two texts read together; every file's sha256 verified). A classifier:
    `predict(pairs)` gives a Prediction per pair; a regressor: `score(pairs)` gives the predicted score per pair, on
    the gold scores' scale (0..score_max).

        ce = CrossEncoder.load("runs/stsb-minilm-cross/bundle")
        ce.score([("A man plays a guitar.", "Someone plays guitar.")])  # array([4.3], dtype=float32)"""

    def __init__(self, folder: Path, manifest: dict, model: OnnxClassifier):
        self.folder = folder
        self.manifest = manifest
        self.model = model
        self.objective: str = manifest["objective"]
        self.labels: list[str] = manifest["labels"]

    @classmethod
    def load(
        cls, folder: Path | str, threads: int | None = None, providers: list[str] | None = None, verify: bool = True
    ) -> CrossEncoder:
        return cls(*_open_bundle(folder, "cross-encoder", CROSS_ENCODER_MANIFEST_VERSION, threads, providers, verify))

    def _logits(self, pairs: object, batch_size: int | None) -> np.ndarray:
        items = clean_pairs(pairs)
        if batch_size is None:
            batch_size = self.manifest["preprocessing"].get("batch_size", 1)
        batch_size = _check_batch_size(batch_size)
        if not items:
            return np.zeros((0, len(self.labels)), np.float32)
        return self.model.logits(items, batch_size)

    def score(self, pairs: list[tuple[str, str]], batch_size: int | None = None) -> np.ndarray:
        """A regressor's predicted score per pair (n,), on the gold scale (the model's output x score_max)."""
        if self.objective != "regression":
            raise BundleError(f"{self.folder}: a pair classifier; use predict(pairs)")
        return np.asarray(self._logits(pairs, batch_size)[:, 0] * self.manifest["score_max"], dtype=np.float32)

    def predict(self, pairs: list[tuple[str, str]], batch_size: int | None = None) -> list[Prediction]:
        """A pair classifier's label and probabilities per pair, in order."""
        if self.objective != "classification":
            raise BundleError(f"{self.folder}: a score regressor; use score(pairs)")
        out = []
        for row in softmax(self._logits(pairs, batch_size)):
            k = int(row.argmax())
            scores = {name: float(p) for name, p in zip(self.labels, row, strict=True)}
            out.append(Prediction(self.labels[k], float(row[k]), scores))
        return out


TAGGER_MANIFEST_VERSION = 1  # bundles of token classifiers (manifest kind "tagger")


class Tagger:
    """Loads a token-classification bundle (verifying every file's sha256) and finds entities in raw text: the text
    is split into words at white space (each word's character offsets kept), each word gets the tag predicted at its
    first sub-token, and BIO tags are read into spans.

        tagger = Tagger.load("runs/wnut17-minilm/bundle")
        tagger.tag(["Empire State Building is in New York"])  # [[Entity('location', 0, 21, ...), ...]]"""

    def __init__(self, folder: Path, manifest: dict, model: OnnxClassifier):
        self.folder = folder
        self.manifest = manifest
        self.model = model
        self.tags: list[str] = manifest["labels"]

    @classmethod
    def load(
        cls, folder: Path | str, threads: int | None = None, providers: list[str] | None = None, verify: bool = True
    ) -> Tagger:
        return cls(*_open_bundle(folder, "tagger", TAGGER_MANIFEST_VERSION, threads, providers, verify))

    def tag_words(self, sentences: list[list[str]]) -> tuple[list[list[int]], list[list[float]]]:
        """Each word's tag id and its probability, one sentence at a time (a word cut off at max_length: O)."""
        ids, probs = [], []
        for words in sentences:
            if not words:
                ids.append([])
                probs.append([])
                continue
            feeds, firsts = encode_words(self.model.encoder, [words])
            p = softmax(self.model.run(feeds)[0])
            ids.append([int(p[f].argmax()) if f >= 0 else 0 for f in firsts[0]])
            probs.append([float(p[f].max()) if f >= 0 else 1.0 for f in firsts[0]])
        return ids, probs

    def tag(self, texts: list[str]) -> list[list[Entity]]:
        """The entities of each text, in order of appearance. Safe to call from several threads at once."""
        texts = clean_texts(texts)
        words = [split_words(t) for t in texts]
        ids, probs = self.tag_words([[w for w, _, _ in ws] for ws in words])
        return [
            spans_from_tags(text, ws, [self.tags[k] for k in tag_ids], p)
            for text, ws, tag_ids, p in zip(texts, words, ids, probs, strict=True)
        ]


def parse_label(generated: str, labels: list[str]) -> int | None:
    """The index of the label whose word comes first in a generated answer (whole words, case ignored), else None."""
    import re

    found = [
        (m.start(), i)
        for i, label in enumerate(labels)
        for m in [re.search(rf"\b{re.escape(label.lower())}\b", generated.lower())]
        if m is not None
    ]
    return min(found)[1] if found else None


@dataclass
class Generation:
    """What `DecoderGenerator.generate` produced, with its timings."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    first_token_seconds: float  # time to first token: the prompt's forward pass
    decode_seconds: float  # the remaining tokens, one forward pass each with the KV cache
    stopped_by: str  # "eos" | "stop string" | "max_new_tokens"

    @property
    def decode_tokens_per_second(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_seconds if len(self.token_ids) > 1 and self.decode_seconds else 0


class KvCache:
    """The key/value cache of a GroupQueryAttention decoder graph (toolchain.llm.fused) for one sequence: one
    preallocated buffer per layer's keys and values, bound with onnxruntime's IOBinding to both the graph's past input
    and its present output, so a run writes its new key/values in place and no step copies the cache. The logits
    output and the decode step's inputs are bound once too; a step changes three numbers and runs.

    `run(ids, start)` feeds `ids` at positions start.. (the cache keeps what is before `start`) and returns the last
    position's logits (a view, overwritten by the next run). The buffers grow by copying when a sequence outgrows
    them (in steps of `block` positions); `run_seconds` adds up the time spent inside onnxruntime."""

    def __init__(self, session: ort.InferenceSession, past_names: list[str], shape: tuple[int, int], dtype: Any):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.past_names = past_names
        self.kv_heads, self.head_dim = shape
        self.dtype = dtype
        self.block = 256
        self.capacity = 0
        self.binding = session.io_binding()
        self._buffers: dict[str, np.ndarray] = {}
        vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == "logits")
        self._logits = np.zeros((1, 1, int(vocab)), np.float32)
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._token = np.zeros((1, 1), np.int64)
        self._token_bound = False
        self.run_seconds = 0.0
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        self.binding.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(self._seqlens))
        self.binding.bind_ortvalue_input("total_sequence_length", ort.OrtValue.ortvalue_from_numpy(self._total))
        self._token_value = ort.OrtValue.ortvalue_from_numpy(self._token)

    def reserve(self, length: int, keep: int) -> None:
        """Room for `length` positions, the first `keep` kept."""
        if length <= self.capacity:
            return
        capacity = -(-length // self.block) * self.block
        for name in self.past_names:
            buffer = np.zeros((1, self.kv_heads, capacity, self.head_dim), self.dtype)
            if keep and name in self._buffers:
                buffer[:, :, :keep] = self._buffers[name][:, :, :keep]
            self._buffers[name] = buffer
            value = self._ort.OrtValue.ortvalue_from_numpy(buffer)
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(name.replace("past_key_values.", "present.", 1), value)
        self.capacity = capacity

    def run(self, ids: np.ndarray, start: int) -> np.ndarray:
        import time

        total = start + ids.shape[1]
        self.reserve(total, start)
        self._seqlens[0] = total - 1
        self._total[...] = total
        if ids.shape[1] == 1:
            self._token[0, 0] = ids[0, 0]
            if not self._token_bound:
                self.binding.bind_ortvalue_input("input_ids", self._token_value)
                self._token_bound = True
        else:
            self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
            self._token_bound = False
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.run_seconds += time.perf_counter() - t0
        return self._logits[0, 0]


class DecoderGenerator:
    """Greedy generation from a decoder ONNX graph with past key/values inputs and present outputs (optimum's
    text-generation-with-past export), numpy + onnxruntime (+ tokenizers for text): no torch.

    The first run feeds the prompt with empty past tensors; each later run feeds one token and the previous run's
    present key/values, so a step costs one token's work whatever the length so far.

    Prompts that share a fixed beginning (a chat template's system turn, an instruction) skip its work with
    `set_prefix(ids)`: its key/values are computed once and every prompt that starts with exactly those ids starts
    from them. `generate_batch_ids` runs several prompts at once: each prompt's own tokens are left-padded after the
    shared prefix, the pads masked out, positions given explicitly, so a row's result does not depend on its padding
    (up to float rounding in the kernels).

    The toolchain's fused graph (GroupQueryAttention; `toolchain.llm.fused`) runs through a `KvCache`: no cache is
    copied, the prefix's key/values stay at the start of the buffers and each prompt that extends the prefix writes
    after them. It runs one prompt at a time (`can_pad` is False: batches run their prompts in turn), and one
    generation at a time per DecoderGenerator (use one per thread)."""

    fused = False
    kv: KvCache | None = None

    def __init__(
        self,
        model_path: Path | str,
        tokenizer_file: Path | str | None = None,
        threads: int | None = None,
        providers: list[str] | None = None,
        eos_token_ids: list[int] | None = None,
    ):
        self.session = make_session(model_path, threads, providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        if not self.past_names:
            raise BundleError(f"{model_path}: no past_key_values inputs; export it with its KV cache")
        self.present_names = [n for n in self.output_names if n.startswith("present.")]
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.past_dtype = np.float16 if "float16" in first.type else np.float32
        # padding inside a batch needs explicit positions; a graph without them runs one prompt at a time
        self.can_pad = "position_ids" in self.input_names and "attention_mask" in self.input_names
        self.fused = "seqlens_k" in self.input_names
        if self.fused:
            self.kv = KvCache(self.session, self.past_names, (self.kv_heads, self.head_dim), self.past_dtype)
        self._setup_text(tokenizer_file, eos_token_ids)

    def _setup_text(self, tokenizer_file: Path | str | None, eos_token_ids: list[int] | None) -> None:
        self.tokenizer = None
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
            # a prompt is encoded whole: a tokenizer.json saved after training carries its truncation (which would
            # cut the chat template's turn markers) and padding; lengths are Generator.fit's and check_length's job
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()
        self.eos = set(eos_token_ids or [])
        self.context_length: int | None = None  # prompt + answer tokens the model takes (None: not known)
        self.prefix_ids: list[int] = []
        self.prefix_past: Any = None
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._cached: list[int] = []  # the ids whose key/values are at the start of the KvCache's buffers

    # -- the model ----------------------------------------------------------------------------------------------

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        """One forward pass: the last position's logits (B, V) and the new cache. `ids` and `positions` (B, T),
        `mask` (B, past + T) with 0 on padding (the fused graph takes no mask and no padding)."""
        feeds = {"input_ids": ids.astype(np.int64), **past}
        if self.fused:
            total = mask.shape[1]
            feeds["seqlens_k"] = np.full((ids.shape[0],), total - 1, np.int32)
            feeds["total_sequence_length"] = np.array(total, np.int32)
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = mask.astype(np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = positions.astype(np.int64)
        outputs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        present = {name.replace("present.", "past_key_values."): outputs[name] for name in self.present_names}
        return outputs["logits"][:, -1], present

    def empty_past(self, batch: int = 1) -> Any:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype) for n in self.past_names}

    def repeat_past(self, past: Any, batch: int) -> Any:
        """The cache of one sequence for `batch` sequences (inputs are never changed by a run: no copy for one)."""
        return past if batch == 1 else {n: np.repeat(a, batch, axis=0) for n, a in past.items()}

    def step(self, ids: np.ndarray, past: Any, total: int) -> tuple[np.ndarray, Any]:
        """One sequence's forward pass: logits of the last position and the new cache. `ids` (1, T); `total` past+T."""
        length = ids.shape[1]
        mask = np.ones((1, total), dtype=np.int64)
        positions = np.arange(total - length, total, dtype=np.int64)[None, :]
        logits, present = self.forward(ids, mask, positions, past)
        return logits[0], present

    # -- generation ---------------------------------------------------------------------------------------------

    def set_prefix(self, ids: list[int]) -> None:
        """Compute the key/values of `ids` once; prompts that start with them (and go on) start from there."""
        self.prefix_ids, self.prefix_past = [], None
        if ids and self.kv is not None:
            self.prefix_ids = list(ids)
            with self._generating():
                self._prefix_in_cache()
        elif ids:
            _, self.prefix_past = self.step(np.array([ids]), self.empty_past(), len(ids))
            self.prefix_ids = list(ids)

    def _prefix_in_cache(self) -> None:
        """Put the prefix's key/values at the start of the KvCache (after a prompt without it overwrote them)."""
        assert self.kv is not None
        if self._cached != self.prefix_ids:
            self._cached = []
            self.kv.run(np.array([self.prefix_ids]), 0)
            self._cached = list(self.prefix_ids)

    def _generating(self) -> Any:
        """The KvCache serves one generation at a time: other threads wait; the same thread with a stream still
        open gets an error instead of a deadlock."""
        import contextlib

        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("a stream of this DecoderGenerator is still open in this thread: finish or close it")

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            with self._lock:
                self._owner = me
                try:
                    yield
                finally:
                    self._owner = None

        return held()

    def _prefill(self, prompts: list[list[int]]) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray]:
        """The prompts' forward pass, from the prefix's cache when every prompt extends it: (last logits, cache,
        attention mask, next position per row)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (an empty text encodes to none)")
        n = len(self.prefix_ids)
        use_prefix = n > 0 and all(len(p) > n and p[:n] == self.prefix_ids for p in prompts)
        start = n if use_prefix else 0
        past = self.repeat_past(self.prefix_past, len(prompts)) if use_prefix else self.empty_past(len(prompts))
        own = [p[start:] for p in prompts]
        width = max(len(o) for o in own)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros((len(prompts), start + width), dtype=np.int64)
        mask[:, :start] = 1
        positions = np.zeros((len(prompts), width), dtype=np.int64)
        for i, o in enumerate(own):
            ids[i, width - len(o) :] = o
            mask[i, start + width - len(o) :] = 1
            positions[i, width - len(o) :] = np.arange(start, start + len(o))
        logits, past = self.forward(ids, mask, positions, past)
        return logits, past, mask, np.array([len(p) for p in prompts], dtype=np.int64)

    def generate_batch_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 8,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> list[list[int]]:
        """Greedy continuations of several prompts in one batch; a row stops at EOS, `stop` or the limit, the
        batch when every row has."""
        _check_new_tokens(max_new_tokens)
        if self.kv is not None or (len(prompts) > 1 and not self.can_pad):
            return [self.generate_ids(p, max_new_tokens, stop)[0] for p in prompts]
        logits, past, mask, nxt = self._prefill(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        while True:
            tokens = logits.argmax(axis=-1)
            for i, token in enumerate(tokens.tolist()):
                if not done[i]:
                    out[i].append(token)
                    done[i] = token in self.eos or len(out[i]) >= max_new_tokens or (stop is not None and stop(out[i]))
            if all(done):
                return out
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(tokens[:, None], mask, nxt[:, None], past)
            nxt = nxt + 1

    def stream_ids(
        self, prompt_ids: list[int], max_new_tokens: int = 8, stop: Callable[[list[int]], bool] | None = None
    ) -> Iterator[int]:
        """Greedy continuation of `prompt_ids`, each new id yielded as soon as it is decoded; ends after EOS, when
        `stop(ids so far)` is true, or at `max_new_tokens`."""
        _check_new_tokens(max_new_tokens)
        if not prompt_ids:
            raise ValueError("every prompt needs at least one token (an empty text encodes to none)")
        if self.kv is not None:
            with self._generating():
                yield from self._stream(prompt_ids, max_new_tokens, stop)
        else:
            yield from self._stream(prompt_ids, max_new_tokens, stop)

    def _stream(
        self, prompt: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool] | None
    ) -> Iterator[int]:
        if self.kv is not None:
            kv = self.kv
            n = len(self.prefix_ids)
            start = 0
            if n and len(prompt) > n and prompt[:n] == self.prefix_ids:
                self._prefix_in_cache()
                start = n
            else:
                self._cached = []  # this prompt overwrites the prefix's key/values
            logits = kv.run(np.array([prompt[start:]]), start)
            position = len(prompt)

            def advance(token: int) -> np.ndarray:
                nonlocal position
                position += 1
                return kv.run(np.array([[token]]), position - 1)

        else:
            first, past, mask, nxt = self._prefill([prompt])
            logits = first[0]

            def advance(token: int) -> np.ndarray:
                nonlocal past, mask, nxt
                mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
                out, past = self.forward(np.array([[token]]), mask, nxt[:, None], past)
                nxt = nxt + 1
                return out[0]

        out: list[int] = []
        while True:
            token = int(logits.argmax())
            out.append(token)
            yield token
            if token in self.eos or (stop is not None and stop(out)) or len(out) >= max_new_tokens:
                return
            logits = advance(token)

    def generate_ids(
        self, prompt_ids: list[int], max_new_tokens: int = 8, stop: Callable[[list[int]], bool] | None = None
    ) -> tuple[list[int], float, float, str]:
        """Greedy continuation of `prompt_ids`: (new ids, first-token seconds, decode seconds, why it stopped)."""
        import time

        t0 = time.perf_counter()
        tokens = self.stream_ids(prompt_ids, max_new_tokens, stop)
        out = [next(tokens)]
        t1 = time.perf_counter()
        out.extend(tokens)
        decode = time.perf_counter() - t1
        if out[-1] in self.eos:
            why = "eos"
        elif stop is not None and stop(out):
            why = "stop string"
        else:
            why = "max_new_tokens"
        return out, t1 - t0, decode, why

    def _stop_check(self, stop_strings: list[str] | None) -> Callable[[list[int]], bool] | None:
        if not stop_strings:
            return None
        tok = self.tokenizer

        def stop(ids: list[int]) -> bool:
            text = tok.decode(ids, skip_special_tokens=True)
            return any(s in text for s in stop_strings)

        return stop

    def _text(self, ids: list[int], stop_strings: list[str] | None) -> str:
        text = self.tokenizer.decode([i for i in ids if i not in self.eos], skip_special_tokens=True)
        for s in stop_strings or []:
            text = text.split(s, 1)[0]
        return text

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise BundleError("generating from text needs the tokenizer file; use the *_ids methods with token ids")
        return self.tokenizer.encode(clean_text(text, "prompt"), add_special_tokens=False).ids

    def check_length(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        """A prompt and its answer must fit the model's context (`context_length`, when known)."""
        if self.context_length and len(prompt_ids) + max_new_tokens > self.context_length:
            raise ValueError(
                f"the prompt is {len(prompt_ids)} tokens and {max_new_tokens} new tokens would follow; the model's "
                f"context is {self.context_length} tokens: shorten the prompt"
            )

    def generate(self, prompt: str, max_new_tokens: int = 8, stop_strings: list[str] | None = None) -> Generation:
        """Greedy text continuation of an already-templated prompt, ending at EOS, a stop string or the limit."""
        prompt_ids = self.encode(prompt)
        self.check_length(prompt_ids, max_new_tokens)
        ids, first, decode, why = self.generate_ids(prompt_ids, max_new_tokens, self._stop_check(stop_strings))
        return Generation(self._text(ids, stop_strings), ids, len(prompt_ids), first, decode, why)

    def generate_batch(
        self,
        prompts: list[str],
        max_new_tokens: int = 8,
        stop_strings: list[str] | None = None,
        batch_size: int = 16,
        progress: Callable[[int], Any] | None = None,
    ) -> list[str]:
        """Greedy text continuations of many prompts, `batch_size` at a time, prompts of similar length together;
        answers in the prompts' order. `progress(n)` is called after each batch with its size."""
        _check_batch_size(batch_size)
        encoded = [self.encode(p) for p in prompts]
        for e in encoded:
            self.check_length(e, max_new_tokens)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        answers = [""] * len(prompts)
        stop = self._stop_check(stop_strings)
        for begin in range(0, len(order), batch_size):
            idx = order[begin : begin + batch_size].tolist()
            batch = self.generate_batch_ids([encoded[i] for i in idx], max_new_tokens, stop)
            for i, ids in zip(idx, batch, strict=True):
                answers[i] = self._text(ids, stop_strings)
            if progress is not None:
                progress(len(idx))
        return answers


def _check_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest run of first ids that every sequence starts with, one id short of the shortest sequence (so
    that every sequence still has a token of its own to run)."""
    if not sequences:
        return []
    first = sequences[0]
    n = min(len(s) for s in sequences) - 1
    for s in sequences[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return list(first[: max(n, 0)])


@dataclass
class Answer:
    """What `Generator.classify` read from a generated answer."""

    label: str | None  # None: the answer names no label
    text: str  # the generated answer
    generation: Generation


class Generator:
    """Loads a generation bundle (a decoder with its KV cache; manifest kind 'generator'), verifying every file's
    sha256, and generates or classifies with numpy, onnxruntime and tokenizers alone.

        gen = Generator.load("runs/sst2-smollm/bundle")
        gen.classify("a gorgeous, witty film").label        # 'positive'
        gen.generate(gen.prompt("a gorgeous, witty film"))  # Generation(text='positive', ...)
    """

    def __init__(self, folder: Path, manifest: dict, decoder: DecoderGenerator, settings: dict):
        self.folder = folder
        self.manifest = manifest
        self.decoder = decoder
        self.settings = settings
        self.labels: list[str] = settings["labels"]

    @classmethod
    def load(
        cls, folder: Path | str, threads: int | None = None, providers: list[str] | None = None, verify: bool = True
    ) -> Generator:
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{folder}: no manifest.json; this is not a bundle folder")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("kind") != "generator":
            raise BundleError(f"{manifest_path}: not a generation bundle (load a classifier bundle with Predictor)")
        if manifest.get("format_version") != GENERATOR_MANIFEST_VERSION:
            raise BundleError(
                f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                f"this runtime reads {GENERATOR_MANIFEST_VERSION}"
            )
        if verify:
            _verify_files(folder, manifest)
        settings = json.loads((folder / manifest["generation"]).read_text())
        decoder = DecoderGenerator(
            folder / manifest["model"],
            folder / manifest["tokenizer"],
            threads,
            providers,
            eos_token_ids=settings["stop_token_ids"],
        )
        decoder.set_prefix(settings.get("prefix_ids", []))
        decoder.context_length = settings.get("context_length")  # bundles before it was recorded: not checked
        return cls(folder, manifest, decoder, settings)

    def prompt(self, text: str) -> str:
        """The prompt the bundle was evaluated with: the recipe's template in the chat template's turn."""
        s = self.settings
        return s["prompt_prefix"] + s["template"].format(text=clean_text(text)) + s["prompt_suffix"]

    def fit(self, text: str) -> str:
        """`text`, cut to its first tokens (as the tokenizer reads the text alone) when its prompt and answer would
        not fit the model's context: a text too long for the model is classified by its beginning."""
        text = clean_text(text)
        limit = self.decoder.context_length
        tokenizer = self.decoder.tokenizer
        if not limit or tokenizer is None:
            return text
        room = limit - self.settings["max_new_tokens"] - len(self.decoder.encode(self.prompt("")))
        if room < 1:
            raise ValueError(f"the prompt template alone fills the model's context of {limit} tokens")
        while len(self.decoder.encode(self.prompt(text))) > limit - self.settings["max_new_tokens"]:
            enc = tokenizer.encode(text, add_special_tokens=False)
            keep = min(room, len(enc.ids) - 1)  # at least one token shorter each time round
            text = text[: enc.offsets[keep - 1][1]] if keep > 0 else ""
            room -= 1  # the template's tokens may merge with the text's at the cut
        return text

    def generate(
        self, prompt: str, max_new_tokens: int | None = None, stop_strings: list[str] | None = None
    ) -> Generation:
        """Greedy continuation of `prompt` (taken as is: use prompt(text) for the bundle's task), with the KV cache;
        ends at the end of turn, a stop string or max_new_tokens (defaults: the bundle's)."""
        s = self.settings
        return self.decoder.generate(
            prompt,
            s["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
            s["stop_strings"] if stop_strings is None else stop_strings,
        )

    def stream(
        self, prompt: str, max_new_tokens: int | None = None, stop_strings: list[str] | None = None
    ) -> Iterator[str]:
        """`generate`, the text yielded piece by piece as tokens are decoded (a piece waits for the rest of a
        character split over tokens); the pieces join to `generate(...).text`.

            for piece in gen.stream(gen.prompt("a gorgeous film")):
                print(piece, end="", flush=True)"""
        s, d = self.settings, self.decoder
        limit = s["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        stops = s["stop_strings"] if stop_strings is None else stop_strings
        prompt_ids = d.encode(prompt)
        d.check_length(prompt_ids, limit)
        ids: list[int] = []
        sent = ""
        for token in d.stream_ids(prompt_ids, limit, d._stop_check(stops)):
            ids.append(token)
            text = d._text(ids, stops)
            if len(text) > len(sent) and not text.endswith("\ufffd"):
                yield text[len(sent) :]
                sent = text
        text = d._text(ids, stops)
        if len(text) > len(sent):
            yield text[len(sent) :]

    def classify(self, text: str) -> Answer:
        """The label the model answers for `text` (None when the answer names no label). A text too long for the
        model's context is classified by its first tokens (see fit); lone surrogates are read as U+FFFD; not a
        str: TypeError."""
        gen = self.generate(self.prompt(self.fit(text)))
        k = parse_label(gen.text, self.labels)
        return Answer(self.labels[k] if k is not None else None, gen.text, gen)

    def classify_batch(self, texts: list[str], batch_size: int | None = None) -> list[str | None]:
        """The label answered for each text, several texts per run (default: the batch size the bundle's accuracy
        was measured with; with int4 or int8 weights a few answers can differ from one-at-a-time runs)."""
        s = self.settings
        answers = self.decoder.generate_batch(
            [self.prompt(self.fit(t)) for t in clean_texts(texts)],
            s["max_new_tokens"],
            s["stop_strings"],
            s.get("batch_size", 1) if batch_size is None else batch_size,
        )
        found = [parse_label(a, self.labels) for a in answers]
        return [self.labels[k] if k is not None else None for k in found]


def _verify_files(folder: Path, manifest: dict) -> None:
    for name, info in manifest["files"].items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"{folder}: {name} is missing")
        if sha256_file(p) != info["sha256"]:
            raise BundleError(
                f"{folder}: {name} does not match its sha256 in manifest.json; the bundle was changed or damaged: "
                "rebuild it"
            )
