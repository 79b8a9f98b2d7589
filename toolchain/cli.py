"""Command line: `python -m toolchain {validate,run,list,report,gate,baseline} ...`.

Exit codes: 0 success; 2 invalid recipe, data or model source (found before any compute); 3 a stage check failed
(parity, budget); 4 the bench gate found a regression; 1 any other toolchain error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from toolchain.errors import RecipeError, ToolchainError

log = logging.getLogger("toolchain")


def _setup_logging(verbose: bool) -> None:
    # Libraries log at WARNING and above (onnxruntime's quantizer is chatty at INFO on the root logger);
    # the toolchain's own stage lines at INFO.
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    # bitsandbytes (imported by peft) warns at import that an optional CPU kernel package is absent; harmless.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def cmd_validate(args: argparse.Namespace) -> int:
    from toolchain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(
        f"{args.recipe}: valid recipe '{recipe.name}' (method {recipe.finetune.method}, "
        f"{len(recipe.compile.quantize)} quantized variant(s), data root {recipe.data_root()})"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from toolchain import pipeline
    from toolchain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    distributed = pipeline.init_distributed()
    if not distributed:
        torch.set_num_threads(recipe.bench.threads or pipeline.default_threads())
    try:
        ctx = pipeline.run(recipe, Path(args.runs) if args.runs else None, force=tuple(args.force))
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if distributed and torch.distributed.is_available() and int(os.environ.get("RANK", "0")) != 0:
        return 0
    run_dir = ctx.run_dir
    reused = sum(r.status == "reused" for r in ctx.records)
    print(f"\nrun {recipe.name}: {len(ctx.records)} stages ({reused} reused)")
    print(f"  bundle: {run_dir / 'bundle'}")
    print(f"  report: {run_dir / 'report.md'} (+ report.json, report.png)")
    if args.readme:
        from toolchain.report import update_readme

        update_readme(Path(args.readme), run_dir / "report.json")
        print(f"  README results table updated: {args.readme}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from toolchain.recipe import list_recipes
    from toolchain.registry import load_all

    print("recipes (make <name>):")
    for name in list_recipes():
        print(f"  {name}")
    print("stages:")
    stages = list(load_all().values())
    w_name, w_kind = max(len(s.name) for s in stages), max(len(s.kind) for s in stages)
    for stage in stages:
        print(f"  {stage.name:<{w_name}}  {stage.kind:<{w_kind}}  {stage.help}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from toolchain.report import render, results_table, update_readme

    path = Path(args.run_dir) / "report.json"
    if not path.is_file():
        raise ToolchainError(f"{path} does not exist; run the recipe first (make <recipe>)")
    render(path)
    if args.readme:
        update_readme(Path(args.readme), path)
    import json

    print(results_table(json.loads(path.read_text())))
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    import json

    from toolchain.gate import GateError, run_gate
    from toolchain.report import results_table

    run_dir = Path(args.run_dir)
    try:
        text = run_gate(run_dir, Path(args.baseline), args.accuracy_tolerance, args.latency_tolerance)
    except GateError as e:
        print(results_table(json.loads((run_dir / "report.json").read_text())) + "\n")
        print(str(e))
        return e.exit_code
    print(results_table(json.loads((run_dir / "report.json").read_text())) + "\n")
    print(text)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from toolchain.gate import write_baseline

    run_dir = Path(args.run_dir)
    if not (run_dir / "report.json").is_file():
        raise ToolchainError(f"{run_dir / 'report.json'} does not exist; run the recipe first")
    data = write_baseline(run_dir, Path(args.out), args.accuracy_tolerance, args.latency_tolerance)
    print(f"baseline for {data['recipe']} ({len(data['variants'])} variants) written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="toolchain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a recipe, its data and model source without running anything")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. finetune.epochs=2")
    v.set_defaults(fn=cmd_validate)

    r = sub.add_parser("run", help="run a recipe: fine-tune, compile, evaluate, benchmark, bundle, report")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. data.max_train_rows=1000")
    r.add_argument("--runs", help="folder that holds run folders (default: runs/ in the project)")
    r.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="rerun this stage (key or stage name) even if its artifact is complete; repeatable",
    )
    r.add_argument("--readme", help="also write the results table into this README")
    r.set_defaults(fn=cmd_run)

    ls = sub.add_parser("list", help="list recipes and registered stages")
    ls.set_defaults(fn=cmd_list)

    rep = sub.add_parser("report", help="rebuild report.md/png from a run's report.json and print the table")
    rep.add_argument("run_dir")
    rep.add_argument("--readme", help="also write the results table into this README")
    rep.set_defaults(fn=cmd_report)

    from toolchain.gate import DEFAULT_ACCURACY_TOLERANCE, DEFAULT_LATENCY_TOLERANCE

    g = sub.add_parser("gate", help="compare a run's report with a committed baseline; exit 4 on a regression")
    g.add_argument("run_dir")
    g.add_argument("--baseline", required=True, help="baseline JSON (bench/baselines/<recipe>.json)")
    g.add_argument("--accuracy-tolerance", type=float, help="points (0-1) below the baseline allowed")
    g.add_argument("--latency-tolerance", type=float, help="fraction beyond the ratio ranges allowed (0.10 = 10%%)")
    g.set_defaults(fn=cmd_gate)

    b = sub.add_parser("baseline", help="write a run's numbers as the baseline the gate compares against")
    b.add_argument("run_dir")
    b.add_argument("--out", required=True)
    b.add_argument("--accuracy-tolerance", type=float, default=DEFAULT_ACCURACY_TOLERANCE)
    b.add_argument("--latency-tolerance", type=float, default=DEFAULT_LATENCY_TOLERANCE)
    b.set_defaults(fn=cmd_baseline)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run RECIPE --force bench key=value`: overrides may also follow the options
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: completed stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
