"""Runs a recipe's stages in order with content-addressed caching, atomic writes and a lineage record.

A stage's id is a hash of (stage name and version, its config, its inputs' ids, what else it reads, library
versions). Its artifact lives in `runs/<recipe>/stages/<key>-<id>/` and is complete only when `artifact.json`
(written last, with the sha256 of every file) is there and the files still match it. A complete artifact is
reused; anything else is rebuilt in a temporary folder that is renamed into place, so an interrupted stage never
leaves a half artifact that looks whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from toolchain import faults
from toolchain.data import Split, load_splits
from toolchain.errors import StageError, ToolchainError, UnexpectedError
from toolchain.recipe import NOT_IN_STAGE_ID, PROJECT_ROOT, Recipe
from toolchain.registry import STAGES, load_all
from toolchain.runtime import sha256_file

log = logging.getLogger("toolchain")

LIBRARIES = (
    "toolchain",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "peft",
    "tokenizers",
    "numpy",
)


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        dist = "edge-toolchain" if name == "toolchain" else name
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path (artifact.json itself excluded)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "artifact.json"
    }


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Artifact:
    """What a stage produced: a folder of files, identified by the hash of everything that made it."""

    key: str
    stage: str
    kind: str
    id: str
    path: Path
    meta: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class StageCall:
    """One use of a registered stage in a plan: its key in the run, config, upstream keys and extra identity."""

    key: str
    stage: str
    config: dict[str, Any]
    inputs: tuple[str, ...] = ()
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    """How a stage went in this run (for the lineage and the log)."""

    key: str
    stage: str
    id: str
    status: str  # ran | reused | rebuilt
    seconds: float
    path: str
    config: dict[str, Any]
    inputs: dict[str, str]
    meta: dict[str, Any]


class RunContext:
    """What stages share during one run: the recipe, its run folder, the data splits, thread settings."""

    def __init__(
        self,
        recipe: Recipe,
        runs_root: Path | None = None,
        *,
        versions: dict[str, str] | None = None,
        threads: int | None = None,
        cpu_preset: str | None = None,
    ):
        """`versions`, `threads` and `cpu_preset` stand in for this machine's (to recompute ids made elsewhere)."""
        self.recipe = recipe
        self.run_dir = (runs_root or PROJECT_ROOT / "runs") / recipe.name
        self.stages_dir = self.run_dir / "stages"
        self.versions = versions or library_versions()
        self._threads = threads
        self._cpu_preset = cpu_preset
        self.records: list[StageRecord] = []
        self.artifacts: dict[str, Artifact] = {}
        self.checkpoint_dir: Path | None = None  # the running stage's folder for resumable checkpoints
        self.resources: dict[str, Any] = {}  # expected disk/memory and what this machine has (resources.check)

    @cached_property
    def splits(self) -> tuple[Split, Split]:
        return load_splits(self.recipe)

    @property
    def train(self) -> Split:
        return self.splits[0]

    @property
    def eval(self) -> Split:
        return self.splits[1]

    @cached_property
    def validation(self) -> Split | None:
        from toolchain.data import load_validation

        return load_validation(self.recipe)

    @property
    def model_key(self) -> str:
        """The artifact holding the model that is exported: the distilled student, else the fine-tuned model."""
        return "distill" if self.recipe.compile.distill is not None else "finetune"

    @property
    def threads(self) -> int:
        return self.recipe.bench.threads or self._threads or default_threads()

    @cached_property
    def cpu_preset(self) -> str:
        """The ORTQuantizer preset this CPU gets (Optimum's baseline is built with it)."""
        from toolchain.compile.optimum_baseline import cpu_flags, cpu_preset

        return self._cpu_preset or cpu_preset(cpu_flags())


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def stage_id(call: StageCall, input_ids: dict[str, str], versions: dict[str, str]) -> str:
    stage = STAGES[call.stage]
    payload = {
        "stage": call.stage,
        "stage_version": stage.version,
        "config": call.config,
        "inputs": input_ids,
        "identity": call.identity,
        "versions": versions,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _complete(folder: Path, sid: str) -> tuple[bool, str]:
    """Is `folder` a whole artifact with id `sid`? Returns (ok, why not)."""
    record = folder / "artifact.json"
    if not record.is_file():
        return False, "absent"
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False, "its artifact.json is unreadable"
    if data.get("id") != sid:
        return False, "its id does not match"
    files = data.get("files", {})
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            return False, f"{rel} is missing"
        if sha256_file(p) != digest:
            return False, f"{rel} no longer matches its recorded sha256"
    return True, ""


def run_stage(ctx: RunContext, call: StageCall, force: bool = False) -> Artifact:
    """Reuse the stage's artifact if it is complete, else build it atomically."""
    stage = STAGES[call.stage]
    inputs = {k: ctx.artifacts[k] for k in call.inputs}
    input_ids = {k: a.id for k, a in inputs.items()}
    sid = stage_id(call, input_ids, ctx.versions)
    folder = ctx.stages_dir / f"{call.key}-{sid[:12]}"
    ok, why = _complete(folder, sid)
    t0 = time.perf_counter()
    if ok and not force:
        meta = json.loads((folder / "artifact.json").read_text())["meta"]
        status = "reused"
    else:
        if why not in ("absent", "") and not force:
            log.warning("stage %s: cached artifact %s is damaged (%s); rebuilding it", call.key, folder, why)
        status = "rebuilt" if why not in ("absent", "") or force else "ran"
        log.info("stage %s: running -> %s", call.key, _rel(folder))
        with phase(ctx, call.key):
            meta = _build(ctx, call, stage.fn, inputs, folder, sid, input_ids)
    seconds = time.perf_counter() - t0
    art = Artifact(call.key, call.stage, stage.kind, sid, folder, meta)
    ctx.artifacts[call.key] = art
    ctx.records.append(
        StageRecord(call.key, call.stage, sid, status, round(seconds, 3), _rel(folder), call.config, input_ids, meta)
    )
    verb = "reused" if status == "reused" else "done"
    log.info("stage %-28s %s in %s -> %s", call.key, verb, _fmt_seconds(seconds), _rel(folder))
    return art


def _build(
    ctx: RunContext,
    call: StageCall,
    fn: Any,
    inputs: dict[str, Artifact],
    folder: Path,
    sid: str,
    input_ids: dict[str, str],
) -> dict[str, Any]:
    ctx.stages_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.stages_dir / f".tmp-{call.key}-{sid[:12]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx.checkpoint_dir = checkpoint_dir(ctx, call.key, sid)
    try:
        with faults.in_stage(call.key, call.stage):
            faults.point(call.key, call.stage, "start")
            meta = fn(ctx, call, inputs, tmp) or {}
            faults.point(call.key, call.stage, "mid-stage")
        record = {
            "id": sid,
            "key": call.key,
            "stage": call.stage,
            "config": call.config,
            "inputs": input_ids,
            "identity": call.identity,
            "versions": ctx.versions,
            "meta": meta,
            "files": hash_tree(tmp),
        }
        (tmp / "artifact.json").write_text(json.dumps(record, indent=2, default=str))
        faults.point(call.key, call.stage, "before-rename")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        faults.point(call.key, call.stage, "after-rename")
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # the artifact is whole: its checkpoints are spent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ctx.checkpoint_dir = None
    return meta


def kept(ctx: RunContext) -> str:
    """What an interrupted or failed run leaves for the next one, in words."""
    done = [r.key for r in ctx.records]
    if not done:
        return "no stage was complete yet"
    names = ", ".join(done) if len(done) <= 6 else f"{', '.join(done[:4])} and {len(done) - 4} more"
    verb = "is" if len(done) == 1 else "are"
    return f"{names} {verb} complete and will be reused"


@contextlib.contextmanager
def phase(ctx: RunContext, name: str) -> Iterator[None]:
    """Run a stage or a step of the engine (plan, report); an exception that is not the toolchain's own comes out
    as an UnexpectedError naming `name` and what was kept (the traceback stays attached as its cause)."""
    try:
        yield
    except ToolchainError:
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the CLI says what the next run reuses
        if not hasattr(e, "toolchain_kept"):
            e.toolchain_kept = kept(ctx)  # type: ignore[attr-defined]
        raise
    except Exception as e:
        raise UnexpectedError(name, e, kept(ctx)) from e


def prepare_run_dir(ctx: RunContext) -> None:
    """With the run lock held: remove what an interrupted run left half-written, put back a bundle it moved aside."""
    from toolchain.bundle import recover_bundle

    stale = remove_stale_temporaries(ctx.stages_dir)
    if stale:
        log.info("removed %d half-written folder(s) an interrupted run left: %s", len(stale), ", ".join(stale))
    notes = recover_bundle(ctx.run_dir / "bundle")
    if notes:
        log.info("an interrupted bundle copy was undone: %s", "; ".join(notes))


def checkpoint_dir(ctx: RunContext, key: str, sid: str) -> Path:
    """Where a stage run keeps resumable checkpoints: keyed by its id, so only the same configuration resumes them;
    kept across interruptions and removed once the artifact is complete."""
    return ctx.stages_dir / ".checkpoints" / f"{key}-{sid[:12]}"


def remove_stale_temporaries(stages_dir: Path) -> list[str]:
    """Delete the half-written stage folders an interrupted or killed run left behind (`.tmp-*`). Called with the
    run lock held, so no live run owns them. Checkpoints are kept: they are how a stage resumes."""
    removed = []
    if stages_dir.is_dir():
        for p in stages_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder so that two runs of one recipe never interleave writes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / ".lock"
    with lock_path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ToolchainError(
                f"{run_dir} is in use by {holder}; wait for that run to finish (or stop it) and try again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


# ---------------------------------------------------------------------------------------------------------------
# The plan: which stages a recipe runs, and the model variants they produce.


@dataclass(frozen=True)
class Variant:
    """A model the report compares: where it comes from (an artifact key) and how it runs."""

    name: str
    source: str  # key of the artifact that holds the model
    format: str  # pytorch | onnx
    precision: str  # fp32 | int8


def plan(recipe: Recipe, ctx: RunContext) -> tuple[list[StageCall], list[Variant]]:
    """The stage calls for a recipe, in order, and the variants they produce."""
    from toolchain.models import source_identity

    d, ft, comp = recipe.data, recipe.finetune, recipe.compile
    train, evl = ctx.splits
    data_identity = {"text": d.text, "label": d.label, "labels": d.labels}
    eval_identity = {**data_identity, "eval_sha256": evl.sha256, "eval_rows": len(evl)}
    calls = [
        StageCall(
            "finetune",
            "finetune",
            ft.model_dump(mode="json", exclude=NOT_IN_STAGE_ID),
            identity={
                "model": source_identity(recipe.model.source, recipe.model),
                **data_identity,
                "train_sha256": train.sha256,
                "max_train_rows": d.max_train_rows,
            },
        ),
    ]
    variants = [Variant("pytorch-fp32", "finetune", "pytorch", "fp32")]
    if comp.distill is not None:
        train_identity = {**data_identity, "train_sha256": train.sha256, "max_train_rows": d.max_train_rows}
        calls.append(
            StageCall(
                "teacher-logits",
                "teacher-logits",
                {"max_length": comp.distill.max_length},
                ("finetune",),
                train_identity,
            )
        )
        validation = ft.validation.model_dump(mode="json") if ft.validation else None
        calls.append(
            StageCall(
                "distill",
                "distill",
                comp.distill.model_dump(mode="json", exclude=NOT_IN_STAGE_ID),
                ("finetune", "teacher-logits"),
                {**train_identity, "validation": validation},
            )
        )
        variants.append(Variant("pytorch-fp32-student", "distill", "pytorch", "fp32"))
    calls.append(StageCall("export", "export", comp.export.model_dump(mode="json"), (ctx.model_key,), eval_identity))
    variants.append(Variant("onnx-fp32", "export", "onnx", "fp32"))
    fp32 = "export"
    if comp.optimize:
        calls.append(StageCall("optimize", "optimize", {"atol": comp.export.atol}, ("export",), eval_identity))
        variants.append(Variant("onnx-fp32-optimized", "optimize", "onnx", "fp32"))
        fp32 = "optimize"
    for q in comp.quantize:
        key = f"quantize.{q.variant_name}"
        # A QAT export starts from the fake-quant model in the finetune artifact, not from the fp32 graph.
        # Static QDQ starts from the unfused export: ONNX shape inference cannot type the outputs of the fused
        # contrib ops (Attention, SkipLayerNormalization), and untyped activations are silently left unquantized.
        source = {"qat-qdq": "finetune", "static-int8": "export"}.get(q.mode, fp32)
        identity = {
            **eval_identity,
            "export": comp.export.model_dump(mode="json"),
            "max_length": recipe.bundle.max_length,
        }
        if q.mode == "static-int8" or q.ranks_nodes:  # calibrated on / selected with training rows
            identity["train_sha256"] = train.sha256
        if q.ranks_nodes:  # ranked and selected at the evaluation batch size, against the budget
            identity["selection"] = {
                "validation": ft.validation.model_dump(mode="json") if ft.validation else None,
                "validation_sha256": ctx.validation.sha256 if ctx.validation is not None else None,
                "auto_file_sha256": sha256_file(recipe.data_root() / q.auto_file) if q.auto_file else None,
                "batch_size": recipe.evaluate.batch_size,
                "max_accuracy_drop": recipe.budget.max_accuracy_drop,
            }
        calls.append(StageCall(key, "quantize", q.model_dump(mode="json"), (source,), identity))
        variants.append(Variant(q.variant_name, key, "onnx", q.precision))
    if recipe.bench.optimum_baseline:
        from toolchain.choose import OPTIMUM_BASELINE

        calls.append(
            StageCall(
                "optimum-baseline",
                "optimum-baseline",
                {"preset": ctx.cpu_preset},
                (ctx.model_key, "export"),  # the export holds the PyTorch reference logits
                {**eval_identity, "export": comp.export.model_dump(mode="json")},
            )
        )
        variants.append(Variant(OPTIMUM_BASELINE, "optimum-baseline", "onnx", "int8"))
    eval_cfg = {"max_length": recipe.bundle.max_length, "batch_size": recipe.evaluate.batch_size}
    for v in variants:
        inputs = tuple(dict.fromkeys((v.source, "finetune")))
        calls.append(
            StageCall(
                f"evaluate.{v.name}",
                "evaluate",
                {**eval_cfg, "variant": v.name, "format": v.format},
                inputs,
                eval_identity,
            )
        )
    bench_cfg = {
        **recipe.bench.model_dump(mode="json"),
        "threads": ctx.threads,
        "max_length": recipe.bundle.max_length,
        "variants": [v.__dict__ for v in variants],
    }
    calls.append(
        StageCall(
            "bench",
            "bench",
            bench_cfg,
            tuple(dict.fromkeys([v.source for v in variants] + ["finetune"])),
            eval_identity,
        )
    )
    return calls, variants


def planned_ids(ctx: RunContext) -> list[tuple[StageCall, str]]:
    """Every stage call a recipe makes before the choice (the bundle's id depends on what is chosen) with the id it
    gets on this run context, computed without running anything."""
    load_all()
    if ctx.recipe.generation is not None:
        from toolchain.llm.run import plan as generation_plan

        calls, _ = generation_plan(ctx.recipe, ctx)
    else:
        calls, _ = plan(ctx.recipe, ctx)
    ids: dict[str, str] = {}
    out = []
    for call in calls:
        ids[call.key] = stage_id(call, {k: ids[k] for k in call.inputs}, ctx.versions)
        out.append((call, ids[call.key]))
    return out


def run(recipe: Recipe, runs_root: Path | None = None, force: tuple[str, ...] = ()) -> RunContext:
    """Run every stage of a recipe; write the bundle and the report. Returns the context (records, artifacts)."""
    from toolchain import report
    from toolchain.bundle import publish_bundle
    from toolchain.choose import choose_variant

    if recipe.generation is not None:  # a decoder LM that classifies by generating: its own stages and report
        from toolchain.llm.run import run_generation

        return run_generation(recipe, runs_root, force)
    load_all()
    ctx = RunContext(recipe, runs_root)
    if _rank() != 0:
        return _run_worker(ctx, force)
    with run_lock(ctx.run_dir):
        log.info("run %s -> %s", recipe.name, _rel(ctx.run_dir))
        prepare_run_dir(ctx)
        with phase(ctx, "plan"):
            ctx.resources = expect_resources(ctx)
            calls, variants = plan(recipe, ctx)
        unknown = [f for f in force if f not in {c.key for c in calls} | {c.stage for c in calls} | {"bundle"}]
        if unknown:
            raise ToolchainError(
                f"--force {', '.join(unknown)}: no such stage; stages: {', '.join(c.key for c in calls)}, bundle"
            )
        forced: set[str] = set()
        for call in calls:
            if call.stage == "finetune":
                _barrier()  # every rank decides reuse-or-train on the same state
            # A forced stage can write different files under the same id, so what reads it is forced too.
            if call.key in force or call.stage in force or forced & set(call.inputs):
                forced.add(call.key)
            run_stage(ctx, call, force=call.key in forced)
            if call.stage == "finetune":
                _barrier()  # the workers are done; rank 0 goes on alone
        with phase(ctx, "choose"):
            rows = report.variant_rows(ctx, variants)
            choice = choose_variant(rows, recipe.budget)
        if choice.shipped is None:
            with phase(ctx, "report"):
                report.write(ctx, rows, choice, bundle=None)
            raise StageError("bundle", "no variant meets the recipe's budget:\n" + choice.table())
        bundle_call = StageCall(
            "bundle",
            "bundle",
            {
                "shipped": choice.shipped,
                "max_length": recipe.bundle.max_length,
                "ort_format": recipe.bundle.ort_format,
                "tokenizer": recipe.bundle.tokenizer,
                "batch_size": recipe.evaluate.batch_size,
                "budget": recipe.budget.model_dump(mode="json"),
            },
            tuple(
                dict.fromkeys(
                    [
                        "finetune",
                        *(v.source for v in variants if v.name == choice.shipped),
                        *(f"evaluate.{v.name}" for v in variants),
                        "bench",
                    ]
                )
            ),
            {"recipe": recipe.model_dump(mode="json")},
        )
        art = run_stage(ctx, bundle_call, force="bundle" in force or bool(forced & set(bundle_call.inputs)))
        with phase(ctx, "publish"):
            bundle_dir = publish_bundle(art, ctx.run_dir / "bundle")
        with phase(ctx, "report"):
            report.write(ctx, rows, choice, bundle=bundle_dir)
            write_lineage(ctx)
    return ctx


def expect_resources(ctx: RunContext) -> dict[str, Any]:
    """State the disk and memory the recipe expects; fail before any compute when the disk cannot hold it."""
    from toolchain import resources
    from toolchain.models import resolve_source

    facts = resources.check(ctx.recipe, resolve_source(ctx.recipe.model.source, ctx.recipe.model), ctx.run_dir)
    gb = resources.GB
    log.info(
        "expects about %.1f GB of artifacts (%.1f GB free here) and %.1f GB of memory to train (%.1f GB here)",
        facts["disk_bytes"] / gb,
        facts["disk_free_bytes"] / gb,
        facts["memory_bytes"] / gb,
        facts["memory_total_bytes"] / gb,
    )
    if facts["memory_bytes"] > facts["memory_total_bytes"]:
        log.warning(
            "training may not fit in memory (about %.1f GB expected, %.1f GB here): lower finetune.batch_size or "
            "finetune.max_length, or use method lora/qlora",
            facts["memory_bytes"] / gb,
            facts["memory_total_bytes"] / gb,
        )
    return facts


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _run_worker(ctx: RunContext, force: tuple[str, ...]) -> RunContext:
    """A torchrun rank other than 0: train with the others in the finetune stage, write nothing, stop."""
    calls, _ = plan(ctx.recipe, ctx)
    call = next(c for c in calls if c.stage == "finetune")
    _barrier()
    sid = stage_id(call, {}, ctx.versions)
    ok, _ = _complete(ctx.stages_dir / f"{call.key}-{sid[:12]}", sid)
    if not ok or call.key in force or call.stage in force:
        scratch = Path(tempfile.mkdtemp(prefix=f"toolchain-rank{_rank()}-"))
        ctx.checkpoint_dir = checkpoint_dir(ctx, call.key, sid)
        try:
            with phase(ctx, call.key), faults.in_stage(call.key, call.stage):
                meta = STAGES[call.stage].fn(ctx, call, {}, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ctx.records.append(StageRecord(call.key, call.stage, sid, "ran", 0.0, "", call.config, {}, meta))
    _barrier()
    return ctx


def init_distributed() -> bool:
    """Join the process group when started by torchrun / accelerate launch (WORLD_SIZE > 1): gloo on the CPU,
    NCCL on GPUs. Returns whether this is a distributed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() != 0:
        log.setLevel(logging.WARNING)
    return True


def write_lineage(ctx: RunContext) -> Path:
    path = ctx.run_dir / "lineage.json"
    data = {
        "recipe": ctx.recipe.name,
        "recipe_file": str(ctx.recipe.path) if ctx.recipe.path else None,
        "versions": ctx.versions,
        "stages": [r.__dict__ for r in ctx.records],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path
