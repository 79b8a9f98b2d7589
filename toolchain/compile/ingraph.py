"""The strings-in graph: the tokenizer moved into the ONNX model with onnxruntime-extensions, so that an app feeds raw
text and gets the label and scores back with onnxruntime and the extensions library alone (no tokenizer library).

    text (string [1]) -> BertTokenizer (ai.onnx.contrib) -> Unsqueeze -> the classifier -> logits (float [1, L])
        logits -> Softmax -> scores (float [1, L])
        logits -> ArgMax -> Gather(labels) -> label (string [1])

The tokenizer op is onnxruntime-extensions' WordPiece (`gen_processing_models` builds it from the transformers
tokenizer); its normalisation and truncation are set from tokenizer.json so that it gives the same ids as the
`tokenizers` library (checked row by row on the eval split by the bundle stage). onnxruntime-extensions' BertTokenizer
reads a second string as a sentence pair, so the graph takes one text per run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import model_inputs
from toolchain.errors import StageError
from toolchain.models import unsupported_tokenizer
from toolchain.runtime import StringsClassifier

PREFIX = "tok/"
CONTRIB = "ai.onnx.contrib"


def tokenizer_graph(tokenizer_dir: Path, max_length: int) -> Any:
    """onnxruntime-extensions' tokenizer graph (string [1] -> model_inputs.BERT_TOKENIZER_OP_OUTPUTS, each [T]),
    normalising and truncating exactly as tokenizer.json says."""
    import onnx
    from onnxruntime_extensions import gen_processing_models
    from transformers import AutoTokenizer

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    refused = unsupported_tokenizer(spec, tokenizer_dir / "tokenizer.json")
    if refused:
        raise StageError("bundle", refused)
    normalizer = spec.get("normalizer") or {}
    try:
        pre, _ = gen_processing_models(AutoTokenizer.from_pretrained(tokenizer_dir), pre_kwargs={})
    except Exception as e:  # the converter raises bare Exceptions for what it cannot convert
        raise StageError("bundle", f"onnxruntime-extensions could not convert the tokenizer: {e}") from e
    (node,) = [n for n in pre.graph.node if n.op_type == "BertTokenizer"]
    lowercase = bool(normalizer.get("lowercase", True))
    # tokenizers' BertNormalizer strips accents when strip_accents is null and lowercase is on.
    strip = normalizer.get("strip_accents")
    strip = lowercase if strip is None else bool(strip)
    attrs = {a.name: a for a in node.attribute}
    for name, value in (("do_lower_case", int(lowercase)), ("strip_accents", int(strip)), ("max_length", max_length)):
        if name in attrs:
            node.attribute.remove(attrs[name])
        node.attribute.append(onnx.helper.make_attribute(name, value))
    return pre


def strings_model(classifier_path: Path, tokenizer_dir: Path, max_length: int, labels: list[str]) -> Any:
    """The classifier with the tokenizer in front and softmax/argmax/label lookup behind it, as one ONNX model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    clf = onnx.load(str(classifier_path))
    pre = tokenizer_graph(tokenizer_dir, max_length)
    graph = clf.graph
    clf_inputs = [i.name for i in graph.input]
    logits = graph.output[0].name
    tok_node = next(n for n in pre.graph.node if n.op_type == "BertTokenizer")
    tok_outputs = {name: f"{PREFIX}{name}" for name in model_inputs.BERT_TOKENIZER_OP_OUTPUTS}
    missing = [n for n in clf_inputs if n not in tok_outputs]
    if missing:
        raise StageError("bundle", f"bundle.tokenizer: in-graph: the model takes {missing}, the tokenizer gives none")
    tokenizer = helper.make_node(  # its outputs in the op's order; the classifier takes the ones it declares
        "BertTokenizer",
        ["text"],
        [*tok_outputs.values(), f"{PREFIX}offsets"],
        name=f"{PREFIX}BertTokenizer",
        domain=CONTRIB,
    )
    tokenizer.attribute.extend(tok_node.attribute)
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), f"{PREFIX}axes0")
    unsqueeze = [
        helper.make_node("Unsqueeze", [tok_outputs[name], axes.name], [name], name=f"{PREFIX}Unsqueeze_{name}")
        for name in clf_inputs
    ]
    label_table = helper.make_tensor("labels", TensorProto.STRING, [len(labels)], [s.encode() for s in labels])
    post = [
        helper.make_node("Softmax", [logits], ["scores"], axis=-1, name="post/Softmax"),
        helper.make_node("ArgMax", [logits], ["label_id"], axis=-1, keepdims=0, name="post/ArgMax"),
        helper.make_node("Gather", ["labels", "label_id"], ["label"], axis=0, name="post/Gather"),
    ]
    nodes = [tokenizer, *unsqueeze, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend([axes, label_table])
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("text", TensorProto.STRING, [1]))
    n_labels = len(labels)
    logits_type = graph.output[0].type.tensor_type.elem_type
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("label", TensorProto.STRING, [1]),
            helper.make_tensor_value_info("scores", logits_type, [1, n_labels]),
            helper.make_tensor_value_info(logits, logits_type, [1, n_labels]),
        ]
    )
    if not any(o.domain == CONTRIB for o in clf.opset_import):
        clf.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    graph.name = f"{graph.name or 'model'}-strings"
    onnx.checker.check_model(clf)
    return clf


def check_strings_model(path: Path, texts: list[str], reference: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Run the strings-in model over `texts` (one per run) and compare its labels with `reference` (label indices of
    the tokenizer-beside model on the same rows, batch 1). Returns agreement counts and the predictions."""

    clf = StringsClassifier(path)
    pred = clf.logits(texts).argmax(-1)
    differ = np.flatnonzero(pred != reference)
    return {
        "rows": len(texts),
        "agree": int(len(texts) - len(differ)),
        "differ_rows": differ[:20].tolist(),
        "predictions": pred,
    }
