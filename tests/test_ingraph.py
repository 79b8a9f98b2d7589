"""The strings-in graph's tokenizer (onnxruntime-extensions) gives the ids the `tokenizers` library gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from toolchain.compile.ingraph import tokenizer_graph
from toolchain.errors import StageError
from toolchain.model_inputs import ENCODING_FIELD
from toolchain.runtime import TextEncoder, extensions_library

TRICKY = [
    "a gorgeous, witty, seductive movie .",
    "Café naïveté über Björk — déjà vu",  # accents: stripped because the MiniLM tokenizer lowercases
    "中文字符 and emoji 😀 mixed in",
    "UPPER case, 1,234.56 numbers; punctuation!?",
    "unaffordableness antidisestablishmentarianism",  # long words split into ##pieces
    " ".join(["word"] * 200),  # cut at max_length with [SEP] kept
    "",
]


@pytest.mark.parametrize("max_length", [16, 128])
def test_in_graph_tokenizer_matches_the_tokenizers_library(tiny_model: Path, max_length: int) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.register_custom_ops_library(extensions_library())
    session = ort.InferenceSession(tokenizer_graph(tiny_model, max_length).SerializeToString(), opts)
    encoder = TextEncoder(tiny_model / "tokenizer.json", max_length, fields=ENCODING_FIELD)
    for text in TRICKY:
        ids, types, mask, _ = session.run(None, {"text": np.array([text], dtype=object)})
        want = encoder.encode([text])
        assert ids.tolist() == want["input_ids"][0].tolist(), text
        assert types.tolist() == want["token_type_ids"][0].tolist()
        assert mask.tolist() == want["attention_mask"][0].tolist()
    assert len(session.run(None, {"text": np.array([TRICKY[5]], dtype=object)})[0]) == max_length


def test_a_tokenizer_it_cannot_put_in_the_graph_is_refused_with_the_fix(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["type"] = "BPE"
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(StageError, match=r"bundle\.tokenizer: beside"):
        tokenizer_graph(folder, 64)
