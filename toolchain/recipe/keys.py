"""Reading a recipe's YAML strictly: a key given twice in one mapping is a problem named by both lines (PyYAML keeps
the last one silently, so a user would train with a value they did not mean), and overrides given twice on the
command line are named by position."""

from __future__ import annotations

from typing import Any

import yaml

_MERGE = "tag:yaml.org,2002:merge"


def duplicate_keys(text: str) -> list[str]:
    """Every key set twice in one mapping, at any depth: 'finetune.lr: set twice, on lines 12 and 15 ...'.

    Walks the composed node tree (before any value is built), so the line of each occurrence is known; aliases are
    followed once, merge keys (`<<: *base`) are left to YAML's rule (explicit keys override merged ones)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError, ValueError):  # reported by the full load that follows
        return []
    problems: list[str] = []
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node | None, path: list[str]) -> None:
        if node is None or id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                    walk(value_node, path)
                    continue
                line = key_node.start_mark.line + 1
                ident = (key_node.tag, key_node.value)
                where = ".".join([*path, str(key_node.value)])
                if ident in first:
                    problems.append(
                        f"{where}: set twice, on lines {first[ident]} and {line} (YAML would keep the second "
                        "silently); keep one"
                    )
                else:
                    first[ident] = line
                walk(value_node, [*path, str(key_node.value)])
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, [*path, str(i)])

    try:
        walk(root, [])
    except RecursionError:  # nested beyond what a recipe needs: the full load says so
        return problems
    return problems


def override_clashes(keys: list[list[str]]) -> list[str]:
    """Overrides that set the same field, or a field and the section holding it: 'overrides 1 and 3 both set
    finetune.lr'. `keys` holds each override's key path, in command-line order (positions count from 1)."""
    problems = []
    for j, b in enumerate(keys):
        for i, a in enumerate(keys[:j]):
            if a == b:
                problems.append(f"overrides {i + 1} and {j + 1} both set {'.'.join(a)}; give it once")
            elif a[: len(b)] == b or b[: len(a)] == a:
                outer, inner = (a, b) if len(a) < len(b) else (b, a)
                problems.append(
                    f"overrides {i + 1} and {j + 1} both set {'.'.join(inner)} (one sets all of "
                    f"{'.'.join(outer)}); give it once"
                )
    return problems


def name_mismatch(raw: dict[str, Any], stem: str, file: str, overridden: bool) -> list[str]:
    """A `name` in the file that is not the file's name: the run would write into another recipe's run folder."""
    name = raw.get("name")
    if overridden or name is None or name == stem:
        return []
    return [
        f"name: '{name}' differs from the file name '{stem}' (runs/<name>/ is the run folder, so {file} would "
        f"write over runs/{name}/); set name: {stem}, remove the name line, or override it with name={name}"
    ]
