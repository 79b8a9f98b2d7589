"""What a text model takes, in one place: the inputs a transformers encoder or its ONNX graph can be fed, where each
comes from in a `tokenizers` Encoding, and which of them a given model's forward actually takes.

Models differ: BERT takes segment ids, DistilBERT, RoBERTa and MPNet do not (feeding them is a TypeError in PyTorch
and an unknown input in onnxruntime). Training, the export's parity reference, evaluation, the bench children, the
QAT export and the strings-in graph ask here; the bundle manifest's `from` fields carry the answer to the Python
runtime and the Node app, which import nothing of the toolchain. No other toolchain module names an optional input.
Light to import (the standard library only)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

# Every input a text classifier can take, in the order graphs list them, with the field of the Python `tokenizers`
# Encoding it comes from (the Node app maps these to its tokenizer's keys: examples/node/bundle.mjs ENCODING_KEY).
ENCODING_FIELD = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
TEXT_INPUTS = tuple(ENCODING_FIELD)
REQUIRED = ("input_ids", "attention_mask")  # what every supported encoder takes
# onnxruntime-extensions' BertTokenizer op (the strings-in graph): its outputs, in order (then the offsets)
BERT_TOKENIZER_OP_OUTPUTS = ("input_ids", "token_type_ids", "attention_mask")


def taken_by(names: Iterable[str]) -> list[str]:
    """The text inputs among `names` (a forward signature's parameters, a graph's inputs), in TEXT_INPUTS order."""
    have = set(names)
    return [n for n in TEXT_INPUTS if n in have]


def forward_inputs(model: Any) -> list[str]:
    """The text inputs a transformers model's forward accepts (a wrapper that takes them positionally, such as the
    embedder's pooling module, lists them as `input_names`)."""
    declared = getattr(model, "input_names", None)
    if isinstance(declared, list):
        return taken_by(declared)
    return taken_by(inspect.signature(model.forward).parameters)


def select(feeds: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The feeds a model takes, by name; a missing one is an error naming it and what was there."""
    names = list(names)
    missing = [n for n in names if n not in feeds]
    if missing:
        raise KeyError(f"the model takes {names}; {missing} not among the inputs given ({sorted(feeds)})")
    return {n: feeds[n] for n in names}


def manifest_inputs(ports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A bundle manifest's `inputs` (name, type, shape) with where an app gets each: `from`, the Encoding field."""
    return [p | {"from": ENCODING_FIELD[p["name"]]} if p["name"] in ENCODING_FIELD else p for p in ports]
