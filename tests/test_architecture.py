"""The shape of the code, checked from its source: no import cycle (function-local and type-only imports count),
imports point one way (cli -> engine -> tasks -> stages and helpers -> core -> recipe/data/models -> runtime),
tasks never import each other, one module each for the engine loop, the bench launcher, the README-block updater
and the bundle publisher, and no stage or task module starts processes or takes the run lock itself."""

from __future__ import annotations

import ast
from pathlib import Path

from toolchain.paths import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "toolchain"

# Lower layers never import higher ones. Modules not listed are stages and their helpers (layer 3).
LAYERS = [
    (
        0,
        (
            "toolchain.errors",
            "toolchain.paths",
            "toolchain.runtime",
            "toolchain.blocks",
            "toolchain.model_inputs",
            "toolchain.weight_parts",
        ),
    ),
    (1, ("toolchain.recipe", "toolchain.data", "toolchain.models")),
    (2, ("toolchain.core",)),
    (4, ("toolchain.tasks",)),
    (5, ("toolchain.engine",)),
    (6, ("toolchain.cli", "toolchain.__main__", "toolchain.launch", "toolchain.scaffold")),
]
STAGE_LAYER = 3


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every toolchain module `path` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES}
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> int:
    for number, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return number
    return STAGE_LAYER


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in GRAPH.items()
        for b in targets
        if layer(b) > layer(a) and not b.startswith(a + ".")
    ]
    assert upward == []


def test_tasks_do_not_import_each_other() -> None:
    tasks = {m for m in MODULES if m.startswith("toolchain.tasks.")}
    assert tasks, "no task modules found"
    assert {(a, b) for a in tasks for b in GRAPH[a] if b in tasks} == set()


def test_the_runtime_apps_embed_imports_nothing_of_the_toolchain() -> None:
    assert GRAPH["toolchain.runtime"] == set()


def _defines(name: str) -> list[str]:
    return [
        m
        for m, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name
    ]


def _calls(name: str) -> list[str]:
    return sorted(
        {
            m
            for m, path in MODULES.items()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
        }
    )


def test_one_module_defines_each_shared_piece() -> None:
    assert _calls("run_stage") == ["toolchain.engine"]  # the one engine loop runs stages
    assert _defines("MeasureProcess") == ["toolchain.core.launcher"]  # the process-per-variant launcher
    assert _defines("replace_block") == ["toolchain.blocks"]  # the one writer of generated Markdown blocks
    assert _defines("publish_bundle") == ["toolchain.core.publish"]
    assert _calls("write_manifest") == [  # the one writer, called by each task's bundle stage
        "toolchain.stages.bundle",
        "toolchain.stages.embed_bundle",
        "toolchain.stages.llm_bundle",
        "toolchain.stages.pair_bundle",
        "toolchain.stages.tag_bundle",
    ]
    assert _defines("write_manifest") == ["toolchain.core.manifest"]
    assert _defines("run_lock") == ["toolchain.core.lock"]
    assert _defines("write_lineage") == ["toolchain.core.lineage"]


def _stage_modules() -> set[str]:
    """Modules that register a stage, and the task modules."""
    out = set()
    for m, path in MODULES.items():
        text = path.read_text()
        if m.startswith("toolchain.tasks.") or "@register(" in text:
            out.add(m)
    return out


def test_stages_and_tasks_leave_processes_locks_and_lineage_to_the_engine() -> None:
    stages = _stage_modules()
    assert {"toolchain.tasks.classification", "toolchain.stages.bench", "toolchain.stages.llm_bench"} <= stages
    offenders = []
    for m in sorted(stages):
        tree = ast.parse(MODULES[m].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "subprocess" for a in node.names):
                offenders.append(f"{m} imports subprocess")
            if isinstance(node, ast.Name) and node.id in ("run_lock", "write_lineage"):
                offenders.append(f"{m} uses {node.id}")
    assert offenders == []


def test_stages_and_their_helpers_never_see_the_recipe_or_the_run() -> None:
    """A stage reads its typed config (validated from what its id hashes), its inputs and the splits its id covers,
    through a StageContext: no stage or helper module imports RunContext or reads `.recipe`, so a setting cannot reach a
    stage without being in its id."""
    helpers = ("stages", "compile", "finetune", "evaluate", "llm", "embed", "tag", "pair", "bundle_files")
    offenders = []
    for m, path in MODULES.items():
        if not m.startswith(tuple(f"toolchain.{h}" for h in helpers)):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "recipe":
                offenders.append(f"{m}:{node.lineno} reads .recipe")
            if isinstance(node, ast.alias) and node.name == "RunContext":
                offenders.append(f"{m}:{node.lineno} imports RunContext")
    assert offenders == []


def test_every_registered_stage_has_a_typed_config() -> None:
    from toolchain import engine
    from toolchain.core.registry import StageConfig

    for name, stage in engine.load_all().items():
        assert stage.config is not StageConfig, f"stage {name} declares no typed config"


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    import re

    pages = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(PROJECT_ROOT)}: {target}")
    assert broken == []


def test_the_readme_stays_short() -> None:
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) <= 200


def test_long_modules_and_functions_say_why() -> None:
    """No module over 400 lines and no function over 80 without a `# long: <reason>` line (the module's, after its
    docstring; the function's, right above it)."""
    unexplained = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        if len(lines) > 400 and not any(line.startswith("# long: ") for line in lines[:40]):
            unexplained.append(f"{m}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if not lines[first - 2].strip().startswith("# long: "):
                    unexplained.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert unexplained == []
