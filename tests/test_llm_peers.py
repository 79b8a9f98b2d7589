"""Peer rows of the generation recipe (onnxruntime-genai, llama.cpp) without building the peers: their environments
are faked under $TOOLCHAIN_CACHE (an interpreter that is this one with stand-in onnxruntime_genai and llama_cpp
packages, a stand-in converter), so the plumbing runs for real: the peer stage builds through the peer's tool, the
answers come from the peer's runtime in a process of that environment, fed the toolchain's prompt ids, the timing
rounds include the peers, and the report compares the shipped decoder with each; a peer is never shipped, and one
whose environment cannot be built is a skip line, not a failed run."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from conftest import tiny_generation_recipe, write_recipe

from toolchain.llm import peers

# The stand-ins answer every prompt with the label word of their model file ("answer" ids), then repeat its last id.
FAKE_OG = """
import json, pathlib
class Config:
    def __init__(self, path): self.path = path; self.overlays = []
    def clear_providers(self): pass
    def overlay(self, text): self.overlays.append(json.loads(text))
class Model:
    def __init__(self, config):
        assert config.overlays[0]["model"]["decoder"]["session_options"]["intra_op_num_threads"] >= 1
        self.answer = json.loads((pathlib.Path(config.path) / "genai_config.json").read_text())["answer"]
class GeneratorParams:
    def __init__(self, model): self.model = model
    def set_search_options(self, **kw): self.max_length, self.min_length = kw["max_length"], kw["min_length"]
class Generator:
    def __init__(self, model, params): self.answer, self.params, self.ids = model.answer, params, []
    def append_tokens(self, ids): self.ids = list(ids); self.start = len(ids)
    def generate_next_token(self):
        k = len(self.ids) - self.start
        token = self.answer[min(k, len(self.answer) - 1)]
        if token == 2 and len(self.ids) < self.params.min_length:
            token = 1000  # as genai: the end of turn suppressed below min_length, the next best token instead
        self.ids.append(token)
    def get_next_tokens(self): return [self.ids[-1]]
    def is_done(self):  # genai stops at its end-of-turn id unless min_length is not reached yet
        ended = self.ids[-1] == 2 and len(self.ids) >= self.params.min_length
        return ended or len(self.ids) >= self.params.max_length
"""
FAKE_BUILDER = """
import json, pathlib, sys
from tokenizers import Tokenizer
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
assert args["-p"] == "int4" and args["-e"] == "cpu"
out = pathlib.Path(args["-o"]); out.mkdir(parents=True)
tok = Tokenizer.from_file(str(pathlib.Path(args["-i"]) / "tokenizer.json"))
answer = tok.encode("positive", add_special_tokens=False).ids + [2]
(out / "genai_config.json").write_text(json.dumps({"answer": answer}))
(out / "model.onnx").write_bytes(b"x" * 1000)
"""
FAKE_CONVERTER = """
import json, pathlib, sys
from tokenizers import Tokenizer
assert "--outtype" in sys.argv
tok = Tokenizer.from_file(str(pathlib.Path(sys.argv[1]) / "tokenizer.json"))
out = pathlib.Path(sys.argv[sys.argv.index("--outfile") + 1])
out.write_text(json.dumps({"answer": tok.encode("negative", add_special_tokens=False).ids + [2]}))
"""
FAKE_LLAMA = """
import ctypes, json, shutil
LLAMA_FTYPE_MOSTLY_Q4_0, LLAMA_FTYPE_MOSTLY_Q4_K_M = 2, 15
class _Params: pass
def llama_model_quantize_default_params(): return _Params()
def llama_model_quantize(src, dst, params):
    shutil.copy(src.decode(), dst.decode()); return 0
_LOGITS = (ctypes.c_float * 49152)()
def llama_get_logits_ith(ctx, i):
    assert i == -1
    return ctypes.cast(_LOGITS, ctypes.POINTER(ctypes.c_float))
class Llama:
    def __init__(self, model_path, n_threads, n_ctx, **kw):
        self.answer = json.load(open(model_path))["answer"]; self.n_tokens = 0; self.start = 0; self.ctx = object()
    def n_vocab(self): return 49152
    def reset(self): self.n_tokens = 0
    def eval(self, ids):
        if self.n_tokens == 0: self.start = len(ids)
        self.n_tokens += len(ids)
        k = self.n_tokens - self.start
        ctypes.memset(_LOGITS, 0, ctypes.sizeof(_LOGITS))
        _LOGITS[self.answer[min(k, len(self.answer) - 1)]] = 1.0
"""


def fake_environment(cache: Path, kind: str, broken: bool = False) -> None:
    """A ready-looking environment for `kind`: its python runs this interpreter with the stand-in packages first."""
    root = cache / "peers" / kind
    packages = root / "fake-packages"
    (root / "venv" / "bin").mkdir(parents=True)
    if kind == peers.GENAI:
        (packages / "onnxruntime_genai" / "models").mkdir(parents=True)
        (packages / "onnxruntime_genai" / "__init__.py").write_text(FAKE_OG)
        (packages / "onnxruntime_genai" / "models" / "__init__.py").write_text("")
        (packages / "onnxruntime_genai" / "models" / "builder.py").write_text(FAKE_BUILDER)
    else:
        (packages / "llama_cpp").mkdir(parents=True)
        (packages / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA)
        for name in peers.CONVERTER:  # what a ready converter holds (the driver script is the stand-in)
            (root / "converter" / name).mkdir(parents=True)
        (root / "converter" / "convert_hf_to_gguf.py").rmdir()
        (root / "converter" / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    python = root / "venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexport PYTHONPATH="{packages}:$PYTHONPATH"\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    spec = peers.stamp(kind)
    if broken:
        spec = {**spec, "packages": ["an older build"]}  # not what this version needs: rebuilt, which fails here
    (root / "stamp.json").write_text(json.dumps(spec))


@pytest.fixture
def peer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(cache))
    return cache


def test_peer_rows_are_built_measured_and_compared_never_shipped(
    tiny_chat_llama: Path, tmp_path: Path, peer_cache: Path
) -> None:
    from toolchain.cli import main

    fake_environment(peer_cache, peers.GENAI)
    fake_environment(peer_cache, peers.LLAMA)
    recipe = tiny_generation_recipe(tiny_chat_llama)
    recipe["generation"]["peers"] = ["ort-genai-int4", "llama.cpp-q4_0", "llama.cpp-q4_k_m"]
    recipe["compile"]["quantize"] = recipe["compile"]["quantize"][1:2]  # one variant of ours is enough here
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path), "--runs", str(tmp_path / "runs")]) == 0
    report = json.loads((tmp_path / "runs" / "tiny-gen" / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    for name, word in (("ort-genai-int4", 1), ("llama.cpp-q4_0", 0), ("llama.cpp-q4_k_m", 0)):
        row = rows[name]
        assert row["peer"] and row["unparsed"] == 0 and row["decode_tokens_per_second"] > 0
        # the stand-in answers one label word for every row: accuracy is that label's share of the eval rows
        share = json.loads(next((tmp_path / "runs" / "tiny-gen" / "stages").glob(f"llm-evaluate.{name}-*/answers.json"))
                           .read_text())  # fmt: skip
        assert set(share) == {["negative", "positive"][word]}
        assert report["verdicts"][name].startswith("peer")
        compared = report["peers"][name]
        assert len(compared["decode_ratio_rounds"]) == 1 and compared["decode_ratio_lowest"] > 0
    assert report["shipped"] not in report["peers"] and not rows[report["shipped"]].get("peer")
    assert "## Against the peers" in (tmp_path / "runs" / "tiny-gen" / "report.md").read_text()


def test_a_peer_that_cannot_be_built_is_a_skip_line(
    tiny_chat_llama: Path, tmp_path: Path, peer_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolchain.cli import main

    fake_environment(peer_cache, peers.GENAI, broken=True)

    def no_registry(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> None:
        raise RuntimeError(f"{cmd[0]} failed (1): no network; log {logfile}")

    monkeypatch.setattr(peers, "_run", no_registry)
    recipe = tiny_generation_recipe(tiny_chat_llama, "tiny-skip")
    recipe["generation"]["peers"] = ["ort-genai-int4"]
    recipe["compile"]["quantize"] = []
    assert main(["run", str(write_recipe(tmp_path, recipe)), "--runs", str(tmp_path / "runs")]) == 0
    report = json.loads((tmp_path / "runs" / "tiny-skip" / "report.json").read_text())
    assert "ort-genai-int4" not in {r["name"] for r in report["variants"]}
    assert "could not be built" in report["skipped"]["ort-genai-int4"]
    assert "- ort-genai-int4: skipped:" in (tmp_path / "runs" / "tiny-skip" / "report.md").read_text()
    assert not (peer_cache / "peers" / peers.GENAI / "stamp.json").exists()  # nothing left that looks ready


def test_the_llama_build_asks_for_this_cpus_features_only() -> None:
    args = peers.cmake_args()
    assert args.startswith("-DGGML_NATIVE=OFF")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    assert ("-DGGML_AVX2=ON" in args) == (" avx2" in flags)
    assert ("-DGGML_AVX512=ON" in args) == (" avx512f" in flags)
