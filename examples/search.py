"""Semantic search with a sentence-embedding bundle (no torch): the 5 AG News test texts closest to a query.

    python examples/search.py runs/stsb-minilm/bundle "oil prices push stocks lower"
"""

import csv
import os
import sys
from pathlib import Path

import numpy as np

from toolchain.runtime import Embedder

bundle, query = sys.argv[1], " ".join(sys.argv[2:])
data = Path(os.environ.get("TOOLCHAIN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
with (data / "agnews" / "test.tsv").open(encoding="utf-8", newline="") as f:
    texts = [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
embedder = Embedder.load(bundle)
corpus = embedder.embed(texts, batch_size=32)  # unit vectors: a dot product is the cosine similarity
scores = corpus @ embedder.embed([query])[0]
for i in np.argsort(-scores)[:5]:
    print(f"{scores[i]:.3f}  {texts[i][:110]}")
