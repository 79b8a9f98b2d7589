"""Check that the Node.js app (examples/node) classifies like the Python runtime: same label on every row (a
sentence-embedding bundle: the cosine between the Node and the Python embedding of every text, both texts of each
eval pair, at least --min-cosine, default 0.9999; a token-classification bundle: the same entities, type and
character offsets, in every eval sentence joined by spaces; a cross-encoder: the same label, or a score within 1e-3,
on every eval pair; a generation bundle: the same greedy tokens for the first 32 eval texts, both the bundle's
answers and 24-token continuations with the end of turn ignored, a difference allowed only at a step where Python's
two best logits are within 1e-3, on at most 2 texts).

    make node-example      # ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix examples/node
    python examples/check_node.py runs/sst2-minilm/bundle            # the bundle's eval split (SST-2 dev, 872 rows)
    python examples/check_node.py runs/sst2-minilm/bundle --texts reviews.txt

Rows come from --texts (a .tsv with a header: the column named by --column, default the recipe's text column; any
other file: one text per line), else the eval file named in the bundle's manifest under $TOOLCHAIN_DATA (default
../shared/data). Both sides run one text at a time. Prints the agreement and the largest logit difference; exit 0
when every label agrees, 1 when one differs, 2 when the check cannot run (no node, no npm packages, no rows).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NODE_APP = HERE / "node" / "classify.mjs"
NODE_EMBED = HERE / "node" / "embed.mjs"
NODE_TAG = HERE / "node" / "tag.mjs"
NODE_PAIRS = HERE / "node" / "pairs.mjs"
NODE_GENERATE = HERE / "node" / "generate.mjs"
TIE = 1e-3  # Python's two best logits closer than this: either token is the greedy one up to float rounding


def read_texts(path: Path, column: str | None) -> list[str]:
    if path.suffix == ".tsv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if column not in (reader.fieldnames or []):
                raise SystemExit(f"error: {path} has no column {column!r} (columns: {reader.fieldnames}); use --column")
            return [row[column] for row in reader]
    return path.read_text(encoding="utf-8").splitlines()


def node_predictions(
    bundle: Path, texts: list[str], threads: int | None = None, app: Path = NODE_APP, extra: tuple[str, ...] = ()
) -> list[dict]:
    """The Node app's JSON output, one object (an embedding app: one array) per text."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH")
    if not (HERE / "node" / "node_modules" / "onnxruntime-node").is_dir():
        raise RuntimeError("the Node packages are not installed: make node-example")
    flags = ["--json"] if app == NODE_APP else []
    cmd = [node, str(app), str(bundle), *flags, *extra] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, input="\n".join(texts) + "\n", capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"the Node app failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    if len(rows) != len(texts):
        raise RuntimeError(f"the Node app printed {len(rows)} rows for {len(texts)} texts")
    return rows


def compare(bundle: Path, texts: list[str], threads: int | None = 1) -> dict:
    """Labels and logits of the Python runtime and the Node app on the same texts."""
    from toolchain.runtime import OnnxClassifier, Predictor

    predictor = Predictor.load(bundle, threads=threads)
    assert isinstance(predictor.classifier, OnnxClassifier)
    py_logits = predictor.classifier.logits(texts, batch_size=1)
    py_labels = [predictor.labels[k] for k in py_logits.argmax(-1)]
    js = node_predictions(bundle, texts, threads)
    js_logits = np.array([r["logits"] for r in js], dtype=np.float64)
    differ = [i for i, (a, r) in enumerate(zip(py_labels, js, strict=True)) if a != r["label"]]
    return {
        "rows": len(texts),
        "agree": len(texts) - len(differ),
        "differ_rows": differ,
        "max_abs_logit_diff": float(np.abs(js_logits - py_logits).max()) if texts else 0.0,
        "python_labels": py_labels,
        "node_labels": [r["label"] for r in js],
    }


def compare_embeddings(bundle: Path, texts: list[str], threads: int | None = 1) -> dict:
    """The cosine between the Node app's and the Python runtime's embedding of each text (one text at a time)."""
    from toolchain.runtime import Embedder

    py = Embedder.load(bundle, threads=threads).embed(texts, batch_size=1).astype(np.float64)
    js = np.array(node_predictions(bundle, texts, threads, NODE_EMBED), dtype=np.float64)
    cosines = (py * js).sum(-1) / (np.linalg.norm(py, axis=1) * np.linalg.norm(js, axis=1))
    return {"rows": len(texts), "cosines": cosines, "min_cosine": float(cosines.min()) if texts else 1.0}


def compare_tags(bundle: Path, texts: list[str], threads: int | None = 1) -> dict:
    """The entities (type, start, end) the Node app and the Python runtime find in each text."""
    from toolchain.runtime import Tagger

    py = [[(e.type, e.start, e.end) for e in spans] for spans in Tagger.load(bundle, threads=threads).tag(texts)]
    js = [
        [(e["type"], e["start"], e["end"]) for e in spans]
        for spans in node_predictions(bundle, texts, threads, NODE_TAG)
    ]
    differ = [i for i, (a, b) in enumerate(zip(py, js, strict=True)) if a != b]
    return {"rows": len(texts), "agree": len(texts) - len(differ), "differ_rows": differ, "python": py, "node": js}


def compare_pairs(bundle: Path, pairs: list[tuple[str, str]], threads: int | None = 1) -> dict:
    """A cross-encoder's output per pair from the Node app and the Python runtime: the score (regression; the largest
    difference) or the label (classification; the pairs where they differ)."""
    from toolchain.runtime import CrossEncoder

    encoder = CrossEncoder.load(bundle, threads=threads)
    js = node_predictions(bundle, [f"{a}\t{b}" for a, b in pairs], threads, NODE_PAIRS)
    if encoder.objective == "regression":
        py = encoder.score(pairs, batch_size=1).astype(np.float64)
        diff = np.abs(py - np.array(js, dtype=np.float64))
        return {"rows": len(pairs), "max_abs_score_diff": float(diff.max()) if pairs else 0.0, "differ_rows": []}
    labels = [p.label for p in encoder.predict(pairs, batch_size=1)]
    differ = [i for i, (a, r) in enumerate(zip(labels, js, strict=True)) if a != r["label"]]
    return {"rows": len(pairs), "max_abs_score_diff": 0.0, "differ_rows": differ}


def compare_generation(bundle: Path, texts: list[str], threads: int | None = 1, tokens: int = 24) -> dict:
    """Greedy token ids of the Node app and the Python runtime for each text's prompt: the bundle's answers
    (end of turn, stop strings, max_new_tokens) and `tokens`-token continuations (end of turn ignored). Where the ids
    differ, Python's gap between its two best logits at the first differing step: a gap under TIE is a near tie."""
    from toolchain.runtime import Generator

    gen = Generator.load(bundle, threads=threads)
    d = gen.decoder
    answers = [gen.classify(t).generation.token_ids for t in texts]
    eos, d.eos = d.eos, set()
    try:
        long = [d.generate_ids(d.encode(gen.prompt(t)), tokens)[0] for t in texts]
    finally:
        d.eos = eos
    js_answers = [r["ids"] for r in node_predictions(bundle, texts, threads, NODE_GENERATE)]
    flags = ("--tokens", str(tokens), "--ignore-eos")
    js_long = [r["ids"] for r in node_predictions(bundle, texts, threads, NODE_GENERATE, flags)]
    ties, differ, gaps = [], [], {}
    for i, text in enumerate(texts):
        pairs = [(answers[i], js_answers[i]), (long[i], js_long[i])]
        first = [next((k for k, (a, b) in enumerate(zip(py, js, strict=False)) if a != b), None) for py, js in pairs]
        where = [(py, k) for (py, js), k in zip(pairs, first, strict=True) if k is not None or len(py) != len(js)]
        if not where:
            continue
        py, k = where[0]
        k = min(len(py) - 1, len(py) if k is None else k)
        # the logits at step k on the path generation takes: the shared prefix, the rest of the prompt, then one
        # token per run (onnxruntime's MatMulNBits gives a row results that depend on how many rows share the run,
        # up to about 1 logit on a 4-bit SmolLM2: a gap read from one run over prompt + tokens is not the one that
        # decided the token)
        prompt = d.encode(gen.prompt(text))
        n = len(d.prefix_ids)
        past, start = d.empty_past(), 0
        if n and len(prompt) > n and prompt[:n] == d.prefix_ids:
            _, past = d.step(np.array([prompt[:n]]), past, n)
            start = n
        logits, past = d.step(np.array([prompt[start:]]), past, len(prompt))
        for total, token in enumerate(py[:k], start=len(prompt) + 1):
            logits, past = d.step(np.array([[token]]), past, total)
        logits = np.sort(logits)
        gaps[i] = float(logits[-1] - logits[-2])
        (ties if gaps[i] < TIE else differ).append(i)
    return {
        "prompts": len(texts),
        "identical": len(texts) - len(ties) - len(differ),
        "near_ties": ties,
        "differ_rows": differ,
        "gaps": gaps,
        "tokens_compared": sum(len(a) + len(b) for a, b in zip(answers, long, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--texts", type=Path, help="rows to classify (default: the bundle's eval file)")
    parser.add_argument("--column", help="the text column of a .tsv (default: the recipe's)")
    parser.add_argument("--limit", type=int, help="only the first N rows")
    parser.add_argument("--min-cosine", type=float, default=0.9999, help="embedding bundles: the least cosine")
    args = parser.parse_args(argv)
    try:
        manifest = json.loads((args.bundle / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {args.bundle}: no readable manifest.json ({e}); is it a bundle folder?", file=sys.stderr)
        return 2
    recipe = manifest["lineage"]["recipe"]
    path = args.texts
    if path is None:
        root = Path(os.environ.get("TOOLCHAIN_DATA", HERE.parent.parent / "shared" / "data"))
        path = root / manifest["metrics"]["eval_file"]
    if not path.is_file():
        print(f"error: {path} does not exist; pass --texts or set TOOLCHAIN_DATA", file=sys.stderr)
        return 2
    columns = [args.column] if args.column else [recipe["data"]["text"], recipe["data"].get("text_pair")]
    if path.suffix == ".jsonl":  # tagged words: the sentences joined by spaces
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [" ".join(r[recipe["data"]["text"]]) for r in rows if r[recipe["data"]["text"]]][: args.limit]
    else:
        texts = [t for c in columns if c for t in read_texts(path, c) if t.strip()][: args.limit]
    if not texts:
        print(f"error: no rows in {path}", file=sys.stderr)
        return 2
    if manifest.get("kind") == "generator":
        try:
            found = compare_generation(args.bundle, texts[: args.limit or 32])
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"{args.bundle}: Node.js (onnxruntime-node) generates the Python runtime's greedy tokens for "
            f"{found['identical']}/{found['prompts']} prompts of {path} ({found['tokens_compared']} tokens: answers "
            f"and 24-token continuations); near ties (two best logits within {TIE}): {len(found['near_ties'])}; "
            f"other differences: {len(found['differ_rows'])}"
        )
        for i in found["near_ties"] + found["differ_rows"]:
            print(f"  prompt {i}: gap {found['gaps'][i]:.2e}: {texts[i][:80]!r}")
        return 0 if not found["differ_rows"] and len(found["near_ties"]) <= 2 else 1
    if manifest.get("kind") == "cross-encoder":
        pair_column = recipe["data"]["text_pair"]
        firsts = read_texts(path, recipe["data"]["text"])
        pairs = [(a, b) for a, b in zip(firsts, read_texts(path, pair_column), strict=True)][: args.limit]
        try:
            found = compare_pairs(args.bundle, pairs)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"{args.bundle}: Node.js (onnxruntime-node) against the Python runtime on {found['rows']} pairs of {path}: "
            f"largest score difference {found['max_abs_score_diff']:.2e}, labels differ on {len(found['differ_rows'])}"
        )
        return 0 if found["max_abs_score_diff"] < 1e-3 and not found["differ_rows"] else 1
    if manifest.get("kind") == "tagger":
        try:
            found = compare_tags(args.bundle, texts)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"{args.bundle}: Node.js (onnxruntime-node) finds the Python runtime's entities (type and character "
            f"offsets) in {found['agree']}/{found['rows']} texts of {path}"
        )
        for i in found["differ_rows"][:20]:
            print(f"  text {i}: python {found['python'][i]}, node {found['node'][i]}: {texts[i][:80]!r}")
        return 0 if found["agree"] == found["rows"] else 1
    if manifest.get("kind") == "embedder":
        try:
            found = compare_embeddings(args.bundle, texts)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        low = np.flatnonzero(found["cosines"] < args.min_cosine)
        print(
            f"{args.bundle}: Node.js (onnxruntime-node) embeds {found['rows'] - len(low)}/{found['rows']} texts of "
            f"{path} within cosine {args.min_cosine} of the Python runtime; lowest cosine {found['min_cosine']:.7f}"
        )
        for i in low[:20]:
            print(f"  text {i}: cosine {found['cosines'][i]:.6f}: {texts[i][:80]!r}")
        return 0 if len(low) == 0 else 1
    try:
        result = compare(args.bundle, texts)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.bundle}: Node.js (onnxruntime-node) agrees with the Python runtime on {result['agree']}/"
        f"{result['rows']} rows of {path}; max |logit difference| {result['max_abs_logit_diff']:.2e}"
    )
    for i in result["differ_rows"][:20]:
        print(f"  row {i}: python {result['python_labels'][i]}, node {result['node_labels'][i]}: {texts[i][:80]!r}")
    return 0 if result["agree"] == result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
