"""Entity-level scores of predicted BIO tags against gold ones, as seqeval computes them (exact span and type;
precision, recall and F1 x 100, overall and per entity type), and the entities a variant lost and gained."""

from __future__ import annotations

from typing import Any

from toolchain.runtime import bio_entities


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Micro precision, recall, F1 (x 100) over all entities, and F1 and support per type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    per_type = {
        k: {"f1": v["f1-score"] * 100, "support": int(v["support"])}
        for k, v in report.items()
        if not k.endswith(" avg")
    }
    return {
        "f1": f1_score(gold, predicted, zero_division=0) * 100,
        "precision": precision_score(gold, predicted, zero_division=0) * 100,
        "recall": recall_score(gold, predicted, zero_division=0) * 100,
        "entities": sum(v["support"] for v in per_type.values()),
        "per_type": per_type,
    }


def entity_changes(
    words: list[list[str]], reference: list[list[str]], variant: list[list[str]], keep: int = 10
) -> dict[str, Any]:
    """Entities the reference tags find and the variant's do not (lost), and the reverse (gained), counted, with the
    first `keep` of each as text."""
    lost: list[dict[str, Any]] = []
    gained: list[dict[str, Any]] = []
    n_lost = n_gained = 0
    for row, (ws, ref, var) in enumerate(zip(words, reference, variant, strict=True)):
        a, b = set(bio_entities(ref)), set(bio_entities(var))
        n_lost += len(a - b)
        n_gained += len(b - a)
        for found, into in ((sorted(a - b, key=lambda e: e[1]), lost), (sorted(b - a, key=lambda e: e[1]), gained)):
            for kind, first, last in found:
                if len(into) < keep:
                    into.append({"row": row, "type": kind, "text": " ".join(ws[first : last + 1])})
    return {"lost": n_lost, "gained": n_gained, "lost_examples": lost, "gained_examples": gained}
