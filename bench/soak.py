"""A long soak of the runtime an app embeds: one process, one Predictor, 100,000 predictions on a shipped bundle.

    python bench/soak.py runs/sst2-minilm/bundle               # 100,000 predictions, windows of 10,000
    python bench/soak.py runs/sst2-minilm/bundle --predictions 20000 --window 2000 --no-docs

Texts are SST-2 dev sentences drawn at random (their own lengths), and 5% texts longer than the bundle's
max_length (cut to max_length tokens), one prediction per call, as an app classifying one text at a time does.
Per window: predictions/s, p50/p99 of a call, and the process's resident memory (VmRSS) at the window's end. The goal
is a flat line: VmRSS after the last window at most 1.05x the first's, no error. The table goes to
docs/reliability.md (between its soak markers) with the machine and the commit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # run from a checkout

from toolchain.blocks import replace_block  # noqa: E402
from toolchain.core.provenance import machine  # noqa: E402
from toolchain.runtime import Predictor  # noqa: E402


def vm_rss() -> int:
    """Resident memory of this process now, in bytes (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--predictions", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    default_data = Path(os.environ.get("TOOLCHAIN_DATA", PROJECT.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default_data, help="the data root (SST-2 dev is read)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/reliability.md")
    args = parser.parse_args(argv)

    predictor = Predictor.load(args.bundle, threads=args.threads)
    max_length = predictor.manifest["preprocessing"]["max_length"]
    with (args.data / "sst2" / "dev.tsv").open(newline="") as f:
        dev = [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]
    rng = random.Random(args.seed)
    long_texts = [" ".join(rng.sample(dev, 12)) for _ in range(50)]  # each far over max_length tokens
    assert all(len(predictor.classifier.encoder.tokenizer.encode(t).ids) >= max_length for t in long_texts)

    windows, errors, latencies = [], 0, []
    start_rss, t_window = vm_rss(), time.perf_counter()
    labels: dict[str, int] = {}
    for i in range(1, args.predictions + 1):
        text = rng.choice(long_texts) if rng.random() < 0.05 else rng.choice(dev)
        t0 = time.perf_counter()
        try:
            (p,) = predictor.predict([text])
            labels[p.label] = labels.get(p.label, 0) + 1
        except (ValueError, TypeError, RuntimeError) as e:  # counted, not fatal: the soak reports every error
            errors += 1
            print(f"prediction {i}: {type(e).__name__}: {e}", file=sys.stderr)
        latencies.append((time.perf_counter() - t0) * 1e3)
        if i % args.window == 0:
            wall = time.perf_counter() - t_window
            lat = np.array(latencies)
            windows.append(
                {
                    "predictions": i,
                    "per_second": args.window / wall,
                    "p50_ms": float(np.percentile(lat, 50)),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "vm_rss_bytes": vm_rss(),
                    "errors": errors,
                }
            )
            w = windows[-1]
            print(
                f"{i:>7}: {w['per_second']:.0f}/s  p50 {w['p50_ms']:.2f} ms  p99 {w['p99_ms']:.2f} ms  "
                f"VmRSS {w['vm_rss_bytes'] / 2**20:.1f} MiB  errors {errors}",
                flush=True,
            )
            latencies, t_window = [], time.perf_counter()

    first, last = windows[0]["vm_rss_bytes"], windows[-1]["vm_rss_bytes"]
    growth = last / first
    ok = growth <= 1.05 and errors == 0
    lines = [
        "| predictions | predictions/s | p50 ms | p99 ms | VmRSS MiB | errors |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {w['predictions']:,} | {w['per_second']:.0f} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} | "
            f"{w['vm_rss_bytes'] / 2**20:.1f} | {w['errors']} |"
            for w in windows
        ),
    ]
    verdict = (
        f"VmRSS at {windows[-1]['predictions']:,} = {growth:.3f}x VmRSS at {windows[0]['predictions']:,} "
        f"(goal <= 1.05x), {errors} errors: {'met' if ok else 'NOT MET'} (VmRSS after loading: "
        f"{start_rss / 2**20:.1f} MiB; labels {labels})"
    )
    table = "\n".join(lines)
    print(table + "\n" + verdict)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "windows": windows, "growth": growth}, indent=2))
    if not args.no_docs:
        manifest = predictor.manifest
        header = (
            f"`{args.bundle}` (`{manifest['variant']}`, max_length {max_length}), one `Predictor.predict([text])` "
            f"per prediction, SST-2 dev sentences and 5% texts over max_length; {machine()}:"
        )
        command = f"python bench/soak.py {args.bundle} --predictions {args.predictions} --window {args.window}"
        replace_block(PROJECT / "docs" / "reliability.md", "soak", f"{header}\n\n{table}\n\n{verdict}", command)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
