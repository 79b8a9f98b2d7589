"""The peers' own environments, outside the project's virtual environment: what a user of onnxruntime-genai or
llama.cpp would install, built once under $TOOLCHAIN_CACHE/peers (default ~/.cache/toolchain/peers) by `make peers`
or on a generation recipe's first use, never by `make test`.

- `ort-genai`: onnxruntime-genai 0.18.0 with its model builder, which imports names that exist only in transformers
  5.x (the project's optimum-onnx caps transformers below 4.58), and onnx-ir, which the builder imports but does not
  declare.
- `llama.cpp`: llama-cpp-python built from its sdist (the registry has no wheel) with the CPU features this machine has
  (GGML_NATIVE crashed at the first evaluation on a Sapphire Rapids VM), and the converter that the sdist vendors
  (vendor/llama.cpp/convert_hf_to_gguf.py with its conversion package and gguf-py), kept beside the environment.

Each environment's stamp (what it holds) is written last: an interrupted build leaves a folder without one, which the
next build deletes and starts again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

log = logging.getLogger("toolchain")

GENAI = "ort-genai"
LLAMA = "llama.cpp"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk, as in the project's environment
SPECS: dict[str, dict[str, object]] = {
    GENAI: {"packages": ["onnxruntime-genai==0.18.0", "transformers==5.25.0", "onnx==1.23.2", "onnx-ir==1.1.0"]},
    LLAMA: {
        "packages": ["numpy", "sentencepiece", "transformers==4.57.6", "safetensors"],
        "sdist": "llama-cpp-python==0.3.36",
    },
}
CPU_FLAGS = {  # /proc/cpuinfo flag -> the ggml build switch (GGML_NATIVE=OFF: only what this CPU has)
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx512f": "GGML_AVX512",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx_vnni": "GGML_AVX_VNNI",
}


def home() -> Path:
    root = Path(os.environ.get("TOOLCHAIN_CACHE", Path.home() / ".cache" / "toolchain"))
    return root / "peers"


def folder(kind: str) -> Path:
    return home() / kind


def python(kind: str) -> Path:
    return folder(kind) / "venv" / "bin" / "python"


def stamp(kind: str) -> dict[str, object]:
    """What a ready environment holds (its spec, this machine's CPU flags for llama.cpp's build)."""
    spec = dict(SPECS[kind])
    if kind == LLAMA:
        spec["cmake_args"] = cmake_args()
    return spec


CONVERTER = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")  # what the converter needs of the sdist


def ready(kind: str) -> bool:
    path = folder(kind) / "stamp.json"
    return path.is_file() and json.loads(path.read_text()) == stamp(kind) and converter_ready(kind)


def converter_ready(kind: str) -> bool:
    return kind != LLAMA or all((folder(kind) / "converter" / name).exists() for name in CONVERTER)


def cmake_args() -> str:
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    on = [f"-D{switch}=ON" for flag, switch in CPU_FLAGS.items() if flag in flags]
    return " ".join(["-DGGML_NATIVE=OFF", *on, "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF"])


def _run(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> None:
    with logfile.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(
            f"{cmd[0]} {' '.join(cmd[1:3])} failed ({proc.returncode}): {' | '.join(tail)}; log {logfile}"
        )


def build(kind: str) -> Path:
    """Build `kind`'s environment if it is not ready; returns its folder. RuntimeError (naming the log) on failure."""
    target = folder(kind)
    if ready(kind):
        return target
    if (
        kind == LLAMA
        and (target / "stamp.json").is_file()
        and json.loads((target / "stamp.json").read_text()) == stamp(kind)
    ):  # the built library is fine, the converter's files are not all there: fetch them again
        logfile = home() / f"{kind}.build.log"
        shutil.rmtree(target / "converter", ignore_errors=True)
        _converter(target, str(SPECS[kind]["sdist"]), logfile)
        return target
    home().mkdir(parents=True, exist_ok=True)
    work = target
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    logfile = home() / f"{kind}.build.log"
    logfile.write_text("")
    t0 = time.time()
    log.info("peers: building the %s environment in %s (log %s)", kind, target, logfile)
    pip = [str(work / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    spec = stamp(kind)
    _run([sys.executable, "-m", "venv", str(work / "venv")], logfile)
    _run([*pip, TORCH], logfile)  # first: pip takes the CPU build from this disk instead of resolving a CUDA one
    _run([*pip, TORCH, *spec["packages"]], logfile)  # type: ignore[list-item]
    if kind == LLAMA:
        env = {"CMAKE_ARGS": str(spec["cmake_args"]), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        _run([*pip, "--no-binary", "llama-cpp-python", str(spec["sdist"])], logfile, env)
        _converter(work, str(spec["sdist"]), logfile)
    (work / "stamp.json").write_text(json.dumps(spec))
    log.info("peers: %s ready in %.0f s", kind, time.time() - t0)
    return target


def _converter(work: Path, sdist: str, logfile: Path) -> None:
    """The sdist's vendored llama.cpp converter (convert_hf_to_gguf.py and gguf-py), kept under work/converter."""
    download = work / "sdist"
    pip = [str(work / "venv" / "bin" / "python"), "-m", "pip"]
    _run([*pip, "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(download), sdist], logfile)
    archive = next(download.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and _needed(m.name)]
        tar.extractall(download, members=members, filter="data")
    root = next(download.glob("*/vendor/llama.cpp"))
    (work / "converter").mkdir()
    for name in CONVERTER:
        if (root / name).is_dir():
            shutil.copytree(root / name, work / "converter" / name)
        else:
            shutil.copy2(root / name, work / "converter" / name)
    shutil.rmtree(download)


def _needed(name: str) -> bool:
    tail = name.split("/vendor/llama.cpp/", 1)[1]
    return any(tail == c or tail.startswith(c + "/") for c in CONVERTER)


def run(kind: str, args: list[str], logfile: Path, path: tuple[str, ...] = ()) -> None:
    """`args` run by `kind`'s python with the project (and `path`) importable, its output appended to `logfile`;
    StageError naming the log's last lines when it fails."""
    from toolchain.errors import StageError
    from toolchain.paths import PROJECT_ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(PROJECT_ROOT)])}
    with logfile.open("a") as f:
        proc = subprocess.run([str(python(kind)), *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = " | ".join(logfile.read_text(errors="replace").splitlines()[-4:])
        raise StageError("llm-peer", f"{kind}: {' '.join(args[:3])} failed ({proc.returncode}): {tail}; log {logfile}")


def main(argv: list[str] | None = None) -> int:
    """`python -m toolchain.llm.peers [kind ...]`: build the peers' environments (all by default)."""
    logging.basicConfig(level=logging.INFO, format="[peers] %(message)s")
    kinds = (argv if argv is not None else sys.argv[1:]) or [GENAI, LLAMA]
    for kind in kinds:
        if kind not in SPECS:
            print(f"error: unknown peer {kind!r}; peers: {', '.join(SPECS)}", file=sys.stderr)
            return 2
        t0 = time.time()
        try:
            build(kind)
        except RuntimeError as e:
            print(f"error: peers: {kind}: {e}", file=sys.stderr)
            return 1
        print(f"peers: {kind} ready in {folder(kind)} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
