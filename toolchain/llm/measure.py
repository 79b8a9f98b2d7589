"""One variant's timing process for llm-bench: load the model, generate a fixed number of tokens after each prompt,
print one JSON line (time to first token per prompt, decode tokens and seconds, load time, peak RSS).

With `passes` > 1 the prompts are timed that many times and the fastest pass's decode counts (the least disturbed by
whatever else the machine runs; the same rule for every variant and peer). PyTorch eager is timed with the runtime's
own greedy loop (`TorchDecoder`): one forward pass over the whole prompt
(no prefix cache), then one per token with the KV cache. End of turn is ignored so that every variant decodes the
same number of tokens.

    python -m toolchain.llm.measure job.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from toolchain.evaluate.stats import peak_rss_bytes


def _runner(job: dict[str, Any]) -> Any:
    from toolchain.runtime import DecoderGenerator

    if job["format"] == "pytorch":
        from toolchain.llm.torch_decoder import TorchDecoder

        gen: DecoderGenerator = TorchDecoder(job["model"], threads=job["threads"])
    else:
        gen = DecoderGenerator(job["model"], threads=job["threads"])

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, int, float | None]:
        """(first-token seconds, decode seconds, decode tokens, seconds of the decode inside onnxruntime's run
        when the graph runs through a KvCache)."""
        t0 = time.perf_counter()
        tokens = gen.stream_ids(prompt, new_tokens)
        next(tokens)
        t1 = time.perf_counter()
        before = gen.kv.run_seconds if gen.kv is not None else 0.0
        n = sum(1 for _ in tokens)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, gen.kv.run_seconds - before if gen.kv is not None else None

    return run


def main(job_file: str) -> int:
    from toolchain.core import faults

    faults.point("llm-bench", "llm-bench", "child")
    job = json.loads(Path(job_file).read_text())
    t0 = time.perf_counter()
    run = _runner(job)
    load = time.perf_counter() - t0
    run(job["prompts"][0], 4)  # warm-up: first-call allocations and kernel choices
    firsts, passes = [], []
    for _ in range(job.get("passes", 1)):  # the prompts `passes` times; the fastest pass's decode counts
        decode_s, decode_n, inside_s = 0.0, 0, 0.0
        for prompt in job["prompts"]:
            first, seconds, n, inside = run(prompt, job["new_tokens"])
            firsts.append(first)
            decode_s += seconds
            decode_n += n
            inside_s += inside or 0.0
        passes.append((decode_s, decode_n, inside_s))
    decode_s, decode_n, inside_s = min(passes)
    print(
        json.dumps(
            {
                "first_token_seconds": firsts,
                "decode_seconds": decode_s,
                "decode_seconds_passes": [p[0] for p in passes],
                "decode_tokens": decode_n,
                "load_seconds": load,
                # the share of decode time spent outside onnxruntime's run (the loop, argmax, bindings): None for
                # graphs run without a KvCache
                "decode_outside_run_share": 1 - inside_s / decode_s if inside is not None and decode_s else None,
                "peak_rss_bytes": peak_rss_bytes(),  # VmHWM: ru_maxrss would keep the parent's peak
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
