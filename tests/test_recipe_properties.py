"""Property-based tests of the recipe validator: whatever the file holds and whatever the overrides say,
`load_recipe` returns a Recipe or raises RecipeError naming the file, never any other exception.

The @example cases are crashes hypothesis or a probe found once (now fixed in toolchain/recipe/); they run
on every run, whatever the random search draws.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from conftest import tiny_recipe_dict
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from toolchain.errors import RecipeError
from toolchain.recipe.load import _inner_model, load_recipe
from toolchain.recipe.schema import Recipe

# database=None: no .hypothesis/ folder in the checkout. Locally every run draws fresh random examples; in CI
# (CI=true, the profile in conftest.py) the same ones every time.
SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


def _field_names(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[str]:
    """Every key the schema knows, at any depth: random keys drawn from these land in the wrong sections."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for field in model.model_fields.values():
        inner = _inner_model(field.annotation)
        if inner is not None:
            names |= _field_names(inner, seen)
    return names


FIELD_NAMES = sorted(_field_names(Recipe))

# Strings the schema or the file checks treat specially, plus paths the OS or pathlib may choke on.
SPECIAL_STRINGS = [
    "",
    " ",
    "auto",
    "real",
    "fp16",
    "bf16",
    "nf4",
    "full",
    "lora",
    "qlora",
    "qat",
    "dynamic-int8",
    "static-int8",
    "int4",
    "qat-qdq",
    "cpu",
    "b1_s32",
    "sst2/train.tsv",
    "sst2/dev.tsv",
    "sst2/missing.tsv",
    "sst2",
    "sentence",
    "label",
    "negative",
    "/",
    ".",
    "..",
    "../..",
    "~",
    "~no-such-user-here",
    "~/nowhere",
    "$HOME",
    "${NO_SUCH_VAR}/x",
    "a\x00b",
    "a" * 300,
    "a/" * 200 + "b.tsv",
    "x.parquet",
    "pypi:",
    "pypi:.",
    "pypi:..x",
    "pypi:no-such-model-package",
    "pypi:a\x00b",
    "org/name",
    "bad id/with spaces",
    "a/b/c",
    "/dev/null",
    "/etc",
]

# Pieces of YAML: structure, anchors and aliases, tags (including the unsafe python ones), odd whitespace.
YAML_FRAGMENTS = [
    "\n",
    "\t",
    "  ",
    "- ",
    ": ",
    "? ",
    ",",
    "[",
    "]",
    "{",
    "}",
    "'",
    '"',
    "#",
    "|",
    ">",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n",
    "&a ",
    "*a",
    "*b",
    "<<: *a",
    "&a [*a]",
    "&a {x: *a}",
    "!!python/object:os.system ",
    "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system",
    "!!python/tuple [1, 2]",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!timestamp 2001-12-14",
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!timestamp ",
    "2001-13-45",
    "!!str ",
    "!foo ",
    "~",
    "null",
    ".nan",
    ".inf",
    "-.inf",
    "1e999",
    "0x1F",
    "0o17",
    "1_000",
    "12:30:00",
    "\ufeff",
    "\x00",
    "\x85",
    "\u2028",
    "name: x\n",
    "model:\n  source: x\n",
    "finetune:\n  method: lora\n",
    "data:\n",
    *(f"{n}: " for n in FIELD_NAMES[:: max(1, len(FIELD_NAMES) // 12)]),
]

# PyYAML recurses once per level; from about 500 levels it runs out of stack.
deep_nesting = st.integers(1, 1200).flatmap(
    lambda n: st.sampled_from(
        [
            "[" * n + "]" * n,
            "{a: " * n + "1" + "}" * n,
            "".join(" " * i + "-\n" for i in range(n)),
            "".join(" " * i + "a:\n" for i in range(n)) + " " * n + "1\n",
            "name: x\nfinetune: " + "[" * n + "]" * n + "\n",
            "&a " * min(n, 50) + "x",
        ]
    )
)
# Integers past Python's int-from-string digit limit (4300) make the YAML resolver's int() fail.
huge_int_text = st.integers(1, 5000).map(lambda n: "finetune:\n  seed: " + "1" * n + "\n")
yaml_ish_text = st.lists(st.one_of(st.sampled_from(YAML_FRAGMENTS), st.text(max_size=6)), max_size=40).map("".join)
any_text = st.one_of(st.text(), yaml_ish_text, deep_nesting, huge_int_text)
any_bytes = st.one_of(
    st.binary(),
    st.tuples(yaml_ish_text, st.binary(min_size=1, max_size=4), yaml_ish_text).map(
        lambda t: t[0].encode() + t[1] + t[2].encode()
    ),
    yaml_ish_text.map(lambda s: s.encode("utf-16")),
    yaml_ish_text.map(lambda s: b"\xef\xbb\xbf" + s.encode()),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62).map(lambda i: i * 10**200),  # far past int64 and float range
    st.integers(min_value=-(2**65), max_value=-(2**62)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-320, 1e308]),
    st.text(max_size=20),
    st.sampled_from(SPECIAL_STRINGS),
    st.sampled_from(FIELD_NAMES),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10), st.integers(), st.booleans(), st.none())
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


def _check(path: Path, overrides: list[str] | None = None, check_files: bool = True) -> Recipe | RecipeError:
    """Load the recipe; anything but a Recipe or a well-formed RecipeError fails the test."""
    try:
        recipe = load_recipe(path, overrides, check_files=check_files)
    except RecipeError as err:
        assert isinstance(err.problems, list) and err.problems, "a RecipeError must list at least one problem"
        for problem in err.problems:
            assert isinstance(problem, str) and problem.strip(), f"empty or non-text problem: {problem!r}"
        assert err.file == str(path)
        assert str(path) in str(err), "the error message must name the recipe file"
        event("RecipeError")
        return err
    assert isinstance(recipe, Recipe)
    event("Recipe")
    assert recipe.path == path
    return recipe


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@settings(max_examples=300, **SETTINGS)
@given(content=st.one_of(any_text, any_bytes), check_files=st.booleans())
@example(content="[" * 1000 + "]" * 1000, check_files=False)  # RecursionError in PyYAML's composer
@example(content="0: 1" + "0" * 4300, check_files=False)  # ValueError: int() past 4300 digits
@example(content="!!int", check_files=False)  # IndexError in PyYAML's construct_yaml_int
@example(content="!!float", check_files=False)  # IndexError in construct_yaml_float
@example(content="!!bool x", check_files=False)  # KeyError in construct_yaml_bool
@example(content="!!timestamp x", check_files=False)  # AttributeError in construct_yaml_timestamp
@example(content="a: 2001-13-45", check_files=False)  # ValueError: month must be in 1..12
def test_any_file_content_gives_recipe_or_recipe_error(tmp_path: Path, content: str | bytes, check_files: bool) -> None:
    path = tmp_path / "fuzz.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    _check(path, check_files=check_files)


@settings(max_examples=200, **SETTINGS)
@given(doc=yaml_values)
def test_any_yaml_document_gives_recipe_or_recipe_error(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(_dump(doc), encoding="utf-8")
    _check(path, check_files=False)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place inside a document (dict keys and list indices), outermost first; the root is ()."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


# The shape of the valid recipe; the test puts in the real tiny model folder before applying a mutation.
SHAPE = tiny_recipe_dict(Path("tiny-model"))
PLACES = _paths(SHAPE)[1:]
CONTAINERS = [p for p in _paths(SHAPE) if isinstance(_get(SHAPE, p), dict | list)]
# The places the file checks turn into OS paths or imports (data.root is not in SHAPE: replacing adds it).
PATH_PLACES = [("data", "root"), ("data", "train"), ("data", "eval"), ("model", "source")]

# Strings a path or model source check may trip on; drawn for many replacements (and for every replacement of
# a PATH_PLACE) so that those checks (check_files=True) see them often, not once in thousands of draws.
path_like = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    st.lists(
        st.sampled_from(["a", "a" * 256, "/", "~", "~x", ".", "..", " ", "\x00", "pypi:", "$HOME", "é"]), max_size=6
    ).map("".join),
)
mutations = st.one_of(
    st.tuples(st.just("replace"), st.sampled_from(PLACES), st.one_of(path_like, yaml_values)),
    st.tuples(st.just("replace"), st.sampled_from(PATH_PLACES), path_like),
    st.tuples(st.just("delete"), st.sampled_from(PLACES), st.none()),
    st.tuples(st.just("add"), st.sampled_from(CONTAINERS), st.tuples(keys, yaml_values)),
)


def _mutate(doc: dict, mutation: tuple) -> dict:
    """Replace the value at a place, delete it, or add a key (to a mapping) or an item (to a list)."""
    kind, place, value = mutation
    if kind == "add":
        node = _get(doc, place)
        key, item = value
        if isinstance(node, dict):
            node[key] = item
        else:
            node.append(item)
        return doc
    parent = _get(doc, place[:-1])
    if kind == "replace":
        parent[place[-1]] = value
    else:
        del parent[place[-1]]
    return doc


@settings(max_examples=300, **SETTINGS)
@given(mutation=mutations)
@example(mutation=("replace", ("data", "root"), "~no-such-user"))  # RuntimeError from Path.expanduser
@example(mutation=("replace", ("data", "root"), "a" * 300))  # OSError: File name too long
@example(mutation=("replace", ("data", "train"), "a" * 300))  # OSError: File name too long
@example(mutation=("replace", ("data", "train"), "a\x00b"))  # ValueError: embedded null byte (Path.resolve)
@example(mutation=("replace", ("model", "source"), "a" * 300))  # OSError: File name too long
@example(mutation=("replace", ("model", "source"), "pypi:"))  # ValueError: Empty module name
@example(mutation=("replace", ("model", "source"), "pypi:."))  # TypeError: relative import
@example(mutation=("replace", ("model", "source"), "bad id/x y"))  # HFValidationError (a ValueError)
def test_mutated_valid_recipe_gives_recipe_or_recipe_error(
    tmp_path: Path, tiny_model: Path, data_root: Path, mutation: tuple
) -> None:
    doc = _mutate(tiny_recipe_dict(tiny_model), mutation)
    note(f"{mutation[0]} {'.'.join(map(str, mutation[1]))}")
    path = tmp_path / "tiny.yaml"
    path.write_text(_dump(doc), encoding="utf-8")
    _check(path, check_files=True)


def _valid_keys(doc: Any) -> list[str]:
    return [".".join(map(str, p)) for p in _paths(doc)[1:]]


override_keys = st.one_of(
    st.sampled_from(_valid_keys(tiny_recipe_dict(Path("m")))),  # existing fields, and indices into lists
    st.sampled_from(FIELD_NAMES).map(lambda n: f"finetune.{n}"),
    st.lists(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=5), st.integers(-2, 5).map(str)), max_size=5).map(
        ".".join
    ),
    st.sampled_from(["", " ", ".", "..", "a..b", ".lr", "finetune.", "compile.quantize.0.mode", "name.x", "bench.0"]),
)
override_values = st.one_of(
    yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**9).removesuffix("\n...\n")),
    yaml_ish_text,
    deep_nesting.map(lambda s: s.replace("\n", " ")),
    st.integers(400, 1200).map(lambda n: "[" * n),  # unclosed and deep: PyYAML recurses before it sees the error
    st.integers(4000, 5000).map(lambda n: "1" * n),
    st.text(max_size=20),
)
overrides = st.lists(
    st.one_of(
        st.tuples(override_keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=20).filter(lambda s: "=" not in s),  # no '='
        override_values.map(lambda v: f"={v}"),  # empty key
        override_keys.map(lambda k: f"{k}="),  # empty value
        st.sampled_from(["=", "==", "a==b", " = ", "finetune.lr=3e-5", "compile.quantize=[]"]),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, **SETTINGS)
@given(overrides=overrides)
@example(overrides=["finetune.seed=" + "[" * 1000])  # RecursionError in PyYAML's composer
@example(overrides=["finetune.seed=!!int"])  # IndexError in PyYAML's construct_yaml_int
@example(overrides=["finetune.seed=!!timestamp x"])  # AttributeError in construct_yaml_timestamp
def test_any_overrides_give_recipe_or_recipe_error(
    tmp_path: Path, tiny_model: Path, data_root: Path, overrides: list[str]
) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(_dump(tiny_recipe_dict(tiny_model)), encoding="utf-8")
    _check(path, overrides, check_files=True)
