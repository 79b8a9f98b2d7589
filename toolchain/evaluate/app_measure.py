"""What an app pays to start a bundle: a fresh process that imports only the runtime, loads the bundle with
`Predictor.load` (sha256 check included), classifies one text and prints one JSON line: the wall-clock moment of its
first result (the parent subtracts the moment it started the process: cold start) and its peak resident memory.

    python -m toolchain.evaluate.app_measure job.json     # job: {"bundle": ..., "threads": N, "text": ...}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from toolchain.evaluate.stats import peak_rss_bytes
from toolchain.runtime import Predictor


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    predictor = Predictor.load(job["bundle"], threads=job["threads"])
    label = predictor.predict([job["text"]])[0].label
    first_result_at = time.time()
    print(json.dumps({"first_result_at": first_result_at, "peak_rss_bytes": peak_rss_bytes(), "label": label}))


if __name__ == "__main__":
    main(sys.argv[1])
