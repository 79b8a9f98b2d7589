"""The typed records the tasks, the choice, the reports and the CI gate pass around: one report row per variant
(report.json's `variants[]`, as a TypedDict so the JSON keeps its shape), and the gate's summary of a report.
`classifier_rows().validate_python(...)` (and the others) check records read back from JSON, keys included."""

from __future__ import annotations

from functools import cache
from typing import Any, NotRequired

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic validates these on Python 3.11 only in this form

from toolchain.core.task import Row

FORBID = ConfigDict(extra="forbid")


@with_config(FORBID)
class LatencyCase(TypedDict):
    p50: float
    p90: float
    p99: float
    mean: float
    cv: float
    n: int
    p50_ci95: list[float]
    items_per_second: float


@with_config(FORBID)
class ClassifierRow(Row):
    """A classifier variant: accuracy on the whole eval split, latency per bench case, memory, parity, what changed."""

    peak_rss_bytes: int | None
    cold_start_seconds: float | None
    latency_ms: dict[str, LatencyCase]  # bench case (b1_s128, ...) -> percentiles
    latency_samples_ms: dict[str, list[float]]
    round_p50: dict[str, list[float]]  # each round's p50, per case
    parity: dict[str, Any] | None  # |variant - PyTorch| on the parity rows
    compression: dict[str, Any]  # mode, excluded nodes, sensitivity, exclude auto
    artifact: str  # the id of the artifact holding the model
    peer: bool  # what another tool makes of the same weights with its defaults: compared, never shipped
    changed_vs_fp32: NotRequired[dict[str, Any]]  # rows whose prediction differs from the baseline's
    reference: NotRequired[bool]  # measured for comparison, never a candidate (an embedder before fine-tuning)
    latency_ratio_to_pytorch: dict[str, float]  # p50 / PyTorch's p50, per case
    latency_ratio_ci: dict[str, list[float]]  # range of the per-round ratios, per case


@with_config(FORBID)
class EmbedderRow(ClassifierRow):
    """A sentence-embedding variant: `accuracy` is Spearman / 100 on the eval pairs (the metric the choice uses),
    with both correlations on the eval and test pairs and the fidelity to the fp32 PyTorch embedder."""

    metric: str  # "spearman": what `accuracy` holds
    spearman: dict[str, float]  # split (eval, test) -> Spearman x 100 of the cosine similarity vs gold
    pearson: dict[str, float]
    fidelity: dict[str, Any] | None  # mean cosine to fp32, nearest neighbours kept (None: the reference itself)
    moved_pairs: NotRequired[list[dict[str, Any]]]  # the eval pairs whose similarity moved most vs fp32


@with_config(FORBID)
class TaggerRow(ClassifierRow):
    """A token-classifier variant: `accuracy` is entity-level F1 / 100 on the eval sentences (the metric the choice
    uses), with F1, precision, recall and per-type F1 on the eval and test sentences."""

    metric: str  # "entity_f1": what `accuracy` holds
    f1: dict[str, float]  # split (eval, test) -> entity-level F1 x 100 (exact span and type)
    entity_precision: dict[str, float]
    entity_recall: dict[str, float]
    per_type: dict[str, dict[str, Any]]  # split -> entity type -> {f1, support}
    entity_changes: NotRequired[dict[str, Any]]  # test entities lost and gained against fp32 PyTorch


@with_config(FORBID)
class PairRow(ClassifierRow):
    """A cross-encoder variant: `accuracy` is the eval accuracy (classification) or Spearman / 100 on the eval pairs
    (regression), the metric the choice uses; `by_split` holds every measure on the eval and test pairs."""

    metric: str  # "accuracy" | "spearman": what `accuracy` holds
    objective: str  # classification | regression
    by_split: dict[str, dict[str, float]]  # split (eval, test) -> accuracy, or spearman and pearson (x 100)


@with_config(FORBID)
class GeneratorRow(Row):
    """A decoder variant: accuracy from greedy answers, agreement with the fp32 graph, decode speed."""

    unparsed: int
    max_new_tokens: int
    eval_batch_size: int | None
    prefix_tokens: int
    agreement_with_onnx_fp32: NotRequired[dict[str, Any]]
    ttft_ms: NotRequired[dict[str, float]]
    decode_tokens_per_second: NotRequired[float]
    decode_tokens_per_second_rounds: NotRequired[list[float]]
    peak_rss_bytes: NotRequired[int]
    load_seconds: NotRequired[float]
    decode_speedup: NotRequired[float]  # vs PyTorch fp32
    decode_outside_run_share: NotRequired[float | None]  # the decode loop's time outside onnxruntime's run (KvCache)
    peer: NotRequired[bool]  # another tool's build of the same tuned weights: compared, never shipped


def latency_case(r: dict[str, Any]) -> LatencyCase:
    """One bench case's statistics as a row holds them (bench.json keeps the raw samples beside them)."""
    return {
        "p50": r["p50"],
        "p90": r["p90"],
        "p99": r["p99"],
        "mean": r["mean"],
        "cv": r["cv"],
        "n": r["n"],
        "p50_ci95": r["p50_ci95"],
        "items_per_second": r["items_per_second"],
    }


def measured_fields(
    bench_variant: dict[str, Any], base_cases: dict[str, Any], meta: dict[str, Any], artifact: str
) -> dict[str, Any]:
    """The keys every non-generation row takes from the bench and the variant's artifact: size, memory, cold start,
    latency per case with its rounds and ratios to PyTorch, parity, compression, the artifact id."""
    from toolchain.evaluate.stats import ratio_interval

    cases = bench_variant["cases"]
    return {
        "size_bytes": bench_variant["size_bytes"],
        "peak_rss_bytes": bench_variant.get("peak_rss_bytes"),
        "cold_start_seconds": bench_variant.get("cold_start_seconds"),
        "latency_ms": {c: latency_case(r) for c, r in cases.items()},
        "latency_samples_ms": {c: r["samples_ms"] for c, r in cases.items()},
        "round_p50": {c: r["round_p50"] for c, r in cases.items() if "round_p50" in r},
        "parity": meta.get("parity") or meta.get("drift_vs_pytorch"),
        "peer": False,
        "compression": {k: meta[k] for k in ("mode", "fusions") if k in meta},
        "artifact": artifact,
        "latency_ratio_to_pytorch": {c: cases[c]["p50"] / base_cases[c]["p50"] for c in cases},
        "latency_ratio_ci": {
            c: ratio_interval(cases[c]["round_p50"], base_cases[c]["round_p50"])
            for c in cases
            if cases[c].get("round_p50") and base_cases[c].get("round_p50")
        },
    }


def problems(error: ValidationError, limit: int = 5) -> str:
    """A validation error in one line: where and what, for the first few problems."""
    found = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].lower()}" for e in error.errors()]
    return "; ".join(found[:limit]) + (f" (and {len(found) - limit} more)" if len(found) > limit else "")


@cache
def classifier_rows() -> TypeAdapter[list[ClassifierRow]]:
    return TypeAdapter(list[ClassifierRow])


@cache
def embedder_rows() -> TypeAdapter[list[EmbedderRow]]:
    return TypeAdapter(list[EmbedderRow])


@cache
def tagger_rows() -> TypeAdapter[list[TaggerRow]]:
    return TypeAdapter(list[TaggerRow])


@cache
def pair_rows() -> TypeAdapter[list[PairRow]]:
    return TypeAdapter(list[PairRow])


@cache
def generator_rows() -> TypeAdapter[list[GeneratorRow]]:
    return TypeAdapter(list[GeneratorRow])


@with_config(FORBID)
class PeerRatio(TypedDict):
    """A variant's p50 against the peer that runs the same kernels (same runtime and precision), per case, with the
    range of the per-round ratios: it does not move with the CPU the way a ratio to PyTorch does."""

    peer: str
    ratio: dict[str, float]
    range: dict[str, list[float]]


@with_config(FORBID)
class GateVariant(TypedDict):
    """One variant in the gate's summary of a report (and in a committed baseline)."""

    accuracy: float
    correct: int | None
    p50_ms: NotRequired[dict[str, float]]
    ratio_to_pytorch: NotRequired[dict[str, float]]
    ratio_range: NotRequired[dict[str, list[float]]]
    vs_peer: NotRequired[PeerRatio]
    decode_speedup: NotRequired[float]
    decode_speedup_range: NotRequired[list[float]]


@with_config(FORBID)
class GateSummary(TypedDict):
    """What the gate compares: a report's accuracies and speed ratios with where they were measured."""

    recipe: str
    measured_at_commit: str | None
    environment: dict[str, Any]
    eval_rows: int
    variants: dict[str, GateVariant]
    kind: NotRequired[str]


@with_config(FORBID)
class GateBaseline(TypedDict):
    """A committed baseline: one summary per CPU class it was measured on (`toolchain.gate.machine_class`), since
    a ratio to PyTorch depends on the CPU's instruction set (int8 kernels gain more from VNNI than fp32 ones)."""

    format_version: int
    recipe: str
    kind: str
    tolerances: dict[str, float]
    machines: dict[str, GateSummary]


@cache
def gate_baseline() -> TypeAdapter[GateBaseline]:
    return TypeAdapter(GateBaseline)
