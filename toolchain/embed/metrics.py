"""How good an embedder is, and how close a compressed one stays to fp32: Spearman and Pearson of the cosine
similarity against gold scores (x 100, as STS results are published), the mean cosine between a variant's and the
reference's embedding of the same text, and the share of each corpus text's nearest neighbours a variant keeps.
numpy and scipy only."""

from __future__ import annotations

from typing import Any

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.asarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def pair_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    return np.asarray((unit(a) * unit(b)).sum(-1), dtype=np.float64)


def correlations(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlation x 100 (scipy.stats)."""
    from scipy.stats import pearsonr, spearmanr

    return {
        "spearman": float(spearmanr(predicted, gold).statistic) * 100,
        "pearson": float(pearsonr(predicted, gold).statistic) * 100,
    }


def mean_cosine_to(reference: np.ndarray, variant: np.ndarray) -> float:
    """The mean cosine between each text's reference embedding and the variant's."""
    return float(pair_cosines(reference, variant).mean())


def neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest other rows by cosine similarity (N, k), nearest first; ties broken by index."""
    u = unit(x)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(x) - 1)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def neighbours_kept(reference: np.ndarray, variant: np.ndarray, k: int) -> float:
    """The share of each text's k nearest neighbours under the reference embeddings that the variant's k nearest
    also hold, averaged over the texts (1.0: every neighbour list kept, order aside)."""
    if len(reference) < 2:
        return 1.0
    ref, var = neighbours(reference, k), neighbours(variant, k)
    kept = [len(set(a) & set(b)) / len(a) for a, b in zip(ref.tolist(), var.tolist(), strict=True)]
    return float(np.mean(kept))


def moved_pairs(
    reference: np.ndarray, variant: np.ndarray, firsts: list[str], seconds: list[str], gold: np.ndarray, keep: int = 5
) -> list[dict[str, Any]]:
    """The pairs whose cosine similarity moved most against the reference's, largest change first."""
    delta = variant - reference
    order = np.argsort(-np.abs(delta), kind="stable")[:keep]
    return [
        {
            "row": int(i),
            "text": firsts[i],
            "text_pair": seconds[i],
            "gold": float(gold[i]),
            "fp32_cosine": round(float(reference[i]), 4),
            "variant_cosine": round(float(variant[i]), 4),
        }
        for i in order
    ]
