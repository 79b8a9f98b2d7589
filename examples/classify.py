"""Classify lines of text with a bundle, the way an app would: numpy, onnxruntime and tokenizers only (no torch).

    python examples/classify.py runs/sst2-minilm/bundle < reviews.txt
    echo "a gorgeous, witty, seductive movie" | python examples/classify.py runs/sst2-minilm/bundle

Prints one line per input line: label, score (the label's probability) and the text, tab-separated.
"""

from __future__ import annotations

import argparse
import sys

from toolchain.runtime import BundleError, Predictor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="a bundle folder (runs/<recipe>/bundle)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the batch size the bundle was measured at"
    )
    args = parser.parse_args(argv)
    try:
        predictor = Predictor.load(args.bundle, threads=args.threads)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for text, prediction in zip(texts, predictor.predict(texts, args.batch_size), strict=True):
        print(f"{prediction.label}\t{prediction.score:.4f}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
