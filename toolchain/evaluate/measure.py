"""Timing one model variant: latency statistics, inputs for each bench case, and the per-variant process that the
bench stage drives (`python -m toolchain.evaluate.measure JOB.json`).

The process loads its variant, answers `ready` (the parent measures cold start from it), then times whatever case
the parent asks for, one JSON line per request on stdin and one JSON line per answer on stdout, until `stop`, when
it reports its peak resident memory. The parent interleaves the variants in rounds, so that a drift of the machine
during the bench hits every variant alike.

Statistics are computed from raw samples (kept in bench.json) so they can be recomputed and tested without clocks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import model_inputs
from toolchain.evaluate.stats import peak_rss_bytes
from toolchain.runtime import OnnxClassifier, OpenVinoClassifier, TextEncoder

Feeds = dict[str, np.ndarray]


def time_calls(
    step: Callable[[Any], Any], batches: list[Any], warmup: int, min_iters: int, min_seconds: float, max_iters: int
) -> list[float]:
    """Milliseconds per call of `step`, cycling through `batches`, after `warmup` untimed calls."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_iters and (len(samples) < min_iters or time.perf_counter() - start < min_seconds):
        b = batches[len(samples) % len(batches)]
        t0 = time.perf_counter()
        step(b)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def case_inputs(
    tokenizer_file: Path, max_length: int, texts: list[Any], batch: int, seq: int | str, buckets: Sequence[int] = ()
) -> list[Feeds]:
    """Encoded batches for one case.

    'real': consecutive eval rows at their own lengths (padded to the longest in each batch, or up to the smallest of
    `buckets` that holds it, as the variant's runtime pads), cycled; a row given as [text, text_pair] is encoded as
    the pair.
    N: every row is N tokens of real eval text (sentences joined, then cut), no padding.
    """
    if texts and isinstance(texts[0], list):  # pairs (a cross-encoder): tuples for the tokenizer, joined for N
        texts = [tuple(t) for t in texts] if seq == "real" else [" ".join(t) for t in texts]
    if seq == "real":
        encoder = TextEncoder(tokenizer_file, max_length, fields=model_inputs.ENCODING_FIELD, buckets=buckets)
        return [encoder.encode(texts[i : i + batch]) for i in range(0, len(texts) - batch + 1, batch)][:256]
    feeds = TextEncoder(tokenizer_file, int(seq), fields=model_inputs.ENCODING_FIELD).encode(
        [" ".join(texts[:200])] * batch
    )
    if feeds["input_ids"].shape[1] != int(seq):
        raise ValueError(f"the eval split has too little text to fill {seq} tokens")
    return [feeds]


def _pytorch_step(model_dir: Path, threads: int) -> Callable[[Feeds], Any]:
    import torch

    torch.set_num_threads(threads)
    from toolchain.evaluate.torch_model import load_pytorch

    model = load_pytorch(model_dir)
    takes = model_inputs.forward_inputs(model)
    embedder = isinstance(getattr(model, "input_names", None), list)  # the pooling module takes its inputs in order

    def step(feeds: dict[str, Any]) -> Any:
        with torch.inference_mode():
            out = (
                model(*model_inputs.select(feeds, takes).values())
                if embedder
                else model(**model_inputs.select(feeds, takes))
            )
            return out if embedder else out.logits

    return step


def case_name(batch: int, seq: int | str) -> str:
    return f"b{batch}_{'real' if seq == 'real' else f's{seq}'}"


class Variant:
    """One loaded variant and the encoded batches of every case."""

    def __init__(self, job: dict[str, Any]):
        threads, tokenizer = job["threads"], Path(job["tokenizer"])
        if job["format"] == "pytorch":
            import torch

            self.step = _pytorch_step(Path(job["model"]), threads)
            convert: Callable[[Feeds], Any] = lambda f: {k: torch.from_numpy(a) for k, a in f.items()}  # noqa: E731
        elif job["format"] == "openvino":
            ov_classifier = OpenVinoClassifier(
                job["model"],
                tokenizer,
                job["max_length"],
                threads,
                job.get("precision"),
                fields=model_inputs.ENCODING_FIELD,
                buckets=job.get("buckets", []),
            )
            self.step = ov_classifier.run
            convert = lambda f: f  # noqa: E731
        else:
            providers = job.get("providers") or ["CPUExecutionProvider"]
            classifier = OnnxClassifier(
                job["model"], tokenizer, job["max_length"], threads, providers, fields=model_inputs.ENCODING_FIELD
            )
            if providers[0] not in classifier.session.get_providers():  # never time the CPU under a GPU's name
                raise RuntimeError(
                    f"{job['model']}: {providers[0]} did not start (onnxruntime runs it on "
                    f"{classifier.session.get_providers()})"
                )
            self.step = classifier.run
            convert = lambda f: f  # noqa: E731
        texts = json.loads(Path(job["texts"]).read_text())
        buckets = job.get("buckets", [])
        self.step(convert(case_inputs(tokenizer, job["max_length"], texts, 1, "real", buckets)[0]))
        self.first_result_at = time.time()  # wall clock: the parent subtracts the moment it started this process
        self.cases = {
            case_name(b, s): [convert(f) for f in case_inputs(tokenizer, job["max_length"], texts, b, s, buckets)]
            for b, s in job["cases"]
        }
        if buckets:  # a shape's model is compiled at its first run: once for each shape here, before any timing
            for feeds in {next(iter(f.values())).shape: f for c in self.cases.values() for f in c}.values():
                self.step(feeds)

    def time(self, case: str, warmup: int, min_iters: int, min_seconds: float, max_iters: int) -> list[float]:
        return time_calls(self.step, self.cases[case], warmup, min_iters, min_seconds, max_iters)


def serve(job: dict[str, Any], requests: Any, answer: Callable[[dict[str, Any]], None]) -> None:
    """The per-variant process's loop: load, say ready, time cases on request, report peak memory on stop."""
    variant = Variant(job)
    answer({"ready": True, "first_result_at": variant.first_result_at})
    for line in requests:
        request = json.loads(line)
        if request["cmd"] == "stop":
            # what this process imported of the toolchain and of its config libraries: none of it is timed, all of
            # it adds to the cold start and memory measured (tests keep it to the timing code itself)
            imported = sorted(m for m in sys.modules if m.split(".")[0] in ("toolchain", "pydantic", "yaml"))
            answer({"peak_rss_bytes": peak_rss_bytes(), "imported": imported})
            return
        samples = variant.time(
            request["case"], request["warmup"], request["min_iters"], request["min_seconds"], request["max_iters"]
        )
        answer({"samples_ms": [round(x, 4) for x in samples]})


def main(job_file: str) -> None:
    import os

    # Answers go to the real stdout; anything a library prints goes to stderr instead of into the protocol.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    def answer(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    from toolchain.core import faults

    faults.point("bench", "bench", "child")
    serve(json.loads(Path(job_file).read_text()), sys.stdin, answer)


if __name__ == "__main__":
    main(sys.argv[1])
