"""Stand-in peer environments under a cache folder: an interpreter that is this one with stand-in onnxruntime_genai
and llama_cpp packages first on its path, and a stand-in llama.cpp converter, so the peer stages, timing rounds and
report run for real without building the peers (tests/test_llm_peers.py, tests/test_interruption.py)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

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
