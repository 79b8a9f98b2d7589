"""The `llm-peer` stage. A peer's model of the tuned weights, built by the peer's own tool in its own environment
(toolchain.llm.peers): onnxruntime-genai's model builder (`-p int4 -e cpu`, its defaults), or llama.cpp's converter
(f16 GGUF) quantized to Q4_0 and Q4_K_M by llama_model_quantize. Peer rows are measured, never shipped.

Helpers: `toolchain.llm.peers`, `toolchain.llm.peer_child`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from toolchain.core.artifact import Artifact, StageCall
from toolchain.core.context import StageContext
from toolchain.core.registry import StageConfig, register
from toolchain.llm import peers

log = logging.getLogger("toolchain")

GGUF = {"llama.cpp-q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "llama.cpp-q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


class LlmPeerConfig(StageConfig):
    peer: str  # ort-genai | llama.cpp
    environment: dict[str, Any]  # the peer environment's packages


def model_path(art: Artifact, variant: str) -> Path:
    """The file or folder a peer variant's runtime loads."""
    return art.file(f"model-{variant.split('-', 1)[1]}.gguf") if variant.startswith("llama.cpp") else art.file("model")


def model_bytes(art: Artifact, variant: str) -> int:
    path = model_path(art, variant)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@register(
    "llm-peer",
    kind="onnx",
    help="A peer's model of the tuned weights built by the peer's own tool (onnxruntime-genai's builder; llama.cpp's "
    "converter and quantizer).",
    config=LlmPeerConfig,
)
def llm_peer(ctx: StageContext, call: StageCall, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    c = ctx.config(LlmPeerConfig)
    peers.build(c.peer)  # ready already (the plan built it); a no-op check
    tuned = inputs["llm-finetune"].path
    logfile = out / "build.log"
    if c.peer == peers.GENAI:
        # the builder's documented CPU int4 command, its defaults otherwise (RTN, block 32, accuracy level 4)
        peers.run(c.peer, ["-m", "onnxruntime_genai.models.builder", "-i", str(tuned), "-o", str(out / "model"),
                          "-p", "int4", "-e", "cpu", "-c", str(out / "cache")], logfile)  # fmt: skip
        return {"peer": c.peer, "files": sorted(p.name for p in (out / "model").iterdir())}
    converter = peers.folder(c.peer) / "converter"
    f16 = out / "model-f16.gguf"
    # the converter imports the gguf-py it was vendored with
    peers.run(c.peer, [str(converter / "convert_hf_to_gguf.py"), str(tuned), "--outfile", str(f16),
                      "--outtype", "f16"], logfile, (str(converter / "gguf-py"),))  # fmt: skip
    outputs = {str(out / f"model-{name.split('-', 1)[1]}.gguf"): ftype for name, ftype in GGUF.items()}
    job = out / "quantize.json"
    threads = os.cpu_count() or 1  # the quantized files do not depend on it
    job.write_text(json.dumps({"mode": "quantize", "model": str(f16), "outputs": outputs, "threads": threads}))
    peers.run(c.peer, ["-m", "toolchain.llm.peer_child", str(job)], logfile)
    f16.unlink()
    job.unlink()
    return {"peer": c.peer, "files": sorted(Path(p).name for p in outputs)}
