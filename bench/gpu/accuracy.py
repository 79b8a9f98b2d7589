"""Accuracy of every ONNX variant of a run on each onnxruntime provider this machine starts, on the run's eval split.

The pipeline measures accuracy on the CPU; an app that ships fp16 to a GPU runs other kernels (half-precision
accumulation, cuBLAS, TensorRT's own fusions). This prints, per variant and provider, the accuracy and how many
labels differ from the same variant on the CPU, and writes them as JSON.

    python bench/gpu/accuracy.py runs/sst2-minilm-gpu [--out gpu-accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toolchain import model_inputs
from toolchain.evaluate.latency import PROVIDERS, available_targets
from toolchain.recipe.load import load_recipe
from toolchain.runtime import OnnxClassifier


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = json.loads((args.run / "report.json").read_text())
    recipe = load_recipe(Path(report["recipe_file"]), check_files=False)
    from toolchain.data import load_splits

    _, rows = load_splits(recipe)
    texts, labels = rows.texts, np.asarray(rows.labels)
    stages = args.run / "stages"
    finetune = next(stages.glob("finetune-*"))
    targets, skipped = available_targets(["cpu", "cuda", "tensorrt"])
    print(f"providers: {targets}; skipped: {skipped}")
    results = []
    for v in report["variants"]:
        if v["format"] != "onnx" or v["name"].startswith("optimum"):
            continue
        model = next(p / "model.onnx" for p in stages.iterdir() if p.name.endswith(v["artifact"][:12]))
        cpu_pred = None
        for t in targets:
            clf = OnnxClassifier(
                model,
                finetune / "tokenizer.json",
                recipe.finetune.max_length,
                None,
                [PROVIDERS[t]],
                fields=model_inputs.ENCODING_FIELD,
            )
            assert clf.session.get_providers()[0] == PROVIDERS[t], clf.session.get_providers()
            pred = clf.logits(texts, batch_size=32).argmax(-1)
            cpu_pred = pred if t == "cpu" else cpu_pred
            row = {
                "variant": v["name"],
                "target": t,
                "accuracy": float((pred == labels).mean()),
                "differs_from_cpu": int((pred != cpu_pred).sum()),
                "rows": len(texts),
            }
            results.append(row)
            print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps({"skipped": skipped, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
