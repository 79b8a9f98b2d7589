"""A peer's decoder run inside the peer's own environment (toolchain.llm.peers), with the peer's own API, fed the
prompt token ids the toolchain's tokenizer made (the same ids every variant gets), greedy, batch 1:

    <peer python> -m toolchain.llm.peer_child job.json      (PYTHONPATH: the project; imports no other module of it)

job: {"peer": "ort-genai" | "llama.cpp", "model": path, "threads": n, "prompts": [[ids]], "new_tokens": n,
      "mode": "time" | "answer" | "quantize"}. Timed prompts decode exactly new_tokens tokens (end of turn ignored);
answers decode up to new_tokens (the parent cuts them after the end-of-turn ids and at the stop strings). "time"
prints one JSON line as toolchain.llm.measure does (first-token seconds per prompt, decode seconds and tokens, load
seconds, peak RSS); "answer" prints {"ids": [...]}; "quantize" (llama.cpp) writes job["outputs"] {name: ftype} from
job["model"] with llama_model_quantize.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (prompt, n) -> (ids, first-token seconds, seconds of the decode steps after it)
Generate = Callable[[list[int], int], tuple[list[int], float, float]]


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def genai(job: dict[str, Any]) -> Generate:
    """onnxruntime-genai's Generator on the builder's folder, the recipe's threads set in the config overlay (the
    documented way), CPU provider; append_tokens runs the prompt, each generate_next_token one decode step."""
    import onnxruntime_genai as og

    config = og.Config(job["model"])
    config.clear_providers()
    threads = {"intra_op_num_threads": job["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)

    # timing: exactly n tokens (min_length = max_length: the end of turn is ignored, as for every variant); answers:
    # genai stops at its end-of-turn ids (min_length would suppress them and answer "positiveLEGATO")
    exact = job["mode"] == "time"

    def generate(prompt: list[int], n: int) -> tuple[list[int], float, float]:
        params = og.GeneratorParams(model)
        length = len(prompt) + n
        params.set_search_options(do_sample=False, max_length=length, min_length=length if exact else 0)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        out = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out, t1 - t0, time.perf_counter() - t1

    return generate


def llama(job: dict[str, Any]) -> Generate:
    """llama.cpp through llama-cpp-python's Llama: eval the prompt, then one token at a time, greedy on the last
    position's logits."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(p) for p in job["prompts"]) + job["new_tokens"]
    llm = Llama(
        model_path=job["model"],
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_ctx=max(512, longest + 16),
        n_batch=512,
        logits_all=False,
        verbose=False,
    )

    vocab = llm.n_vocab()

    def last_logits() -> Any:
        # with logits_all=False Llama.eval no longer copies the logits into llm.scores (0.3.36): read the context's
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def generate(prompt: list[int], n: int) -> tuple[list[int], float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        out = [int(np.argmax(last_logits()))]
        t1 = time.perf_counter()
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(int(np.argmax(last_logits())))
        return out, t1 - t0, time.perf_counter() - t1

    return generate


def quantize(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    done = {}
    for path, ftype in job["outputs"].items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.nthread = job["threads"]
        t0 = time.perf_counter()
        code = llama_cpp.llama_model_quantize(job["model"].encode(), path.encode(), params)
        if code != 0:
            raise RuntimeError(f"llama_model_quantize {ftype} returned {code}")
        done[path] = round(time.perf_counter() - t0, 1)
    return {"seconds": done}


def main(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    if job["mode"] == "quantize":
        print(json.dumps(quantize(job)))
        return 0
    t0 = time.perf_counter()
    generate = genai(job) if job["peer"] == "ort-genai" else llama(job)
    load = time.perf_counter() - t0
    n = job["new_tokens"]
    if job["mode"] == "answer":
        print(json.dumps({"ids": [generate(p, n)[0] for p in job["prompts"]]}))
        return 0
    generate(job["prompts"][0], 4)  # warm-up, as toolchain.llm.measure
    firsts, passes = [], []
    for _ in range(job.get("passes", 1)):  # as toolchain.llm.measure: the fastest pass's decode counts
        decode_s, decode_n = 0.0, 0
        for prompt in job["prompts"]:
            ids, first, decode = generate(prompt, n)
            firsts.append(first)
            decode_s += decode
            decode_n += len(ids) - 1
        passes.append((decode_s, decode_n))
    decode_s, decode_n = min(passes)
    result = {
        "first_token_seconds": firsts,
        "decode_seconds": decode_s,
        "decode_seconds_passes": [p[0] for p in passes],
        "decode_tokens": decode_n,
        "load_seconds": load,
        "decode_outside_run_share": None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
