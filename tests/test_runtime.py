"""The runtime an app embeds (toolchain/runtime.py) under bad input and load: whatever it is given, `Predictor.predict`
and `Generator.classify/generate` answer with the documented result or one ValueError/TypeError naming the problem,
never a crash or an onnxruntime error; one Predictor shared by 8 threads gives exactly the sequential results."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from toolchain.runtime import Generator, Predictor

SETTINGS = {"database": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}

# Texts an app meets: empty, blank, control characters, lone surrogates (a broken emoji from a JSON escape), emoji
# and CJK, NUL, very long text, and any unicode hypothesis draws.
SPECIAL = [
    "",
    " ",
    "\t\n\r \u3000",
    "\x00",
    "a\x00b\x07\x1b[31m",
    "\ud800",
    "half an emoji \ud83d here",
    "😀🎬👍🏽",
    "これは素晴らしい映画です",
    "\u202edesrever\u202c",
    "a" * 100_000,
    "word " * 20_000,
]
texts = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=300), st.text(alphabet=st.characters(), max_size=50))


@pytest.fixture(scope="module")
def predictor(first_run, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    _, runs, _ = first_run
    bundle = tmp_path_factory.mktemp("bundle") / "bundle"
    shutil.copytree(runs / "tiny" / "bundle", bundle)
    return Predictor.load(bundle)


@pytest.fixture(scope="module")
def generator(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Generator:
    bundle = tmp_path_factory.mktemp("gen-bundle") / "bundle"
    shutil.copytree(tiny_run / "bundle", bundle)
    return Generator.load(bundle)


def _check(p: Predictor, got: list, n: int) -> None:
    assert len(got) == n
    for pred in got:
        assert pred.label in p.labels and 0.0 <= pred.score <= 1.0
        assert abs(sum(pred.scores.values()) - 1.0) < 1e-4 and pred.scores[pred.label] == pred.score


@settings(max_examples=60, **SETTINGS)
@given(batch=st.lists(texts, max_size=12))
@example(batch=[])
@example(batch=["x" * 1_000_000])  # 1 MB of text
@example(batch=[*SPECIAL])
def test_predict_answers_every_list_of_strings(predictor: Predictor, batch: list[str]) -> None:
    got = predictor.predict(batch)
    _check(predictor, got, len(batch))
    assert predictor.predict(batch) == got  # the same answer every time


def test_predict_reads_lone_surrogates_as_the_replacement_character(predictor: Predictor) -> None:
    assert predictor.predict(["a \ud800 film"]) == predictor.predict(["a \ufffd film"])
    assert predictor.predict(["great \ud83d"]) == predictor.predict(["great \ufffd"])


def test_a_text_over_max_length_is_classified_by_its_first_tokens(predictor: Predictor) -> None:
    max_length = predictor.manifest["preprocessing"]["max_length"]
    long = "a gorgeous , witty , seductive movie . " * max_length  # far over max_length tokens
    assert predictor.predict([long]) == predictor.predict([long + " but a dreadful, boring ending"])
    (first,) = predictor.classifier.encoder.tokenizer.encode_batch([long])
    assert len(first.ids) == max_length


@pytest.mark.parametrize(
    "bad, error, says",
    [
        ("one text", TypeError, "pass [text]"),
        (b"bytes", TypeError, "got one bytes"),
        (None, TypeError, "got NoneType"),
        (42, TypeError, "got int"),
        (["ok", 3], TypeError, "texts[1] must be a str, got int"),
        (["ok", None], TypeError, "texts[1] must be a str, got NoneType"),
        ([["nested"]], TypeError, "texts[0] must be a str, got list"),
    ],
)
def test_predict_refuses_what_is_not_a_list_of_strings(predictor: Predictor, bad, error, says) -> None:
    with pytest.raises(error, match=re.escape(says)):
        predictor.predict(bad)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, "8", True])
def test_predict_refuses_a_batch_size_that_is_not_a_positive_whole_number(predictor: Predictor, batch_size) -> None:
    with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1"):
        predictor.predict(["ok"], batch_size=batch_size)


def test_predict_takes_ten_thousand_texts_in_one_call(predictor: Predictor, data_root: Path) -> None:
    from toolchain.data import read_split

    dev = read_split(data_root / "sst2" / "dev.tsv", "sentence", "label", ["negative", "positive"]).texts
    batch = [dev[i % len(dev)] for i in range(10_000)]
    got = predictor.predict(batch, batch_size=64)
    _check(predictor, got, 10_000)
    assert got[: len(dev)] == got[len(dev) : 2 * len(dev)]  # the same text, the same answer, wherever it sits


def test_eight_threads_sharing_one_predictor_get_the_sequential_results(predictor: Predictor, data_root: Path) -> None:
    from toolchain.data import read_split

    dev = read_split(data_root / "sst2" / "dev.tsv", "sentence", "label", ["negative", "positive"]).texts[:400]
    chunks = [dev[i::8] for i in range(8)]
    want = [predictor.predict(c) for c in chunks]
    got: list = [None] * 8
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            start.wait()  # all eight call predict at once
            for _ in range(3):
                result = predictor.predict(chunks[i])
                assert got[i] is None or got[i] == result
                got[i] = result
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == want


# -- the generator ----------------------------------------------------------------------------------------------


@settings(max_examples=25, **SETTINGS)
@given(text=texts)
@example(text="x" * 1_000_000)  # far beyond the model's context: classified by its first tokens
@example(text="word " * 20_000)
@example(text="{text} {} {0} }{")  # braces: the template is filled once, the text is data
def test_classify_answers_every_string(generator: Generator, text: str) -> None:
    answer = generator.classify(text)
    assert answer.label is None or answer.label in generator.labels
    assert isinstance(answer.text, str) and answer.generation.prompt_tokens <= generator.decoder.context_length
    again = generator.classify(text)
    assert (again.label, again.text, again.generation.token_ids) == (
        answer.label,
        answer.text,
        answer.generation.token_ids,
    )


def test_a_text_too_long_for_the_context_is_classified_by_its_beginning(generator: Generator) -> None:
    limit = generator.decoder.context_length
    assert limit == 512  # the tiny Llama's max_position_embeddings, recorded in generation.json
    long = "a gorgeous, witty, seductive movie. " * 400
    fitted = generator.fit(long)
    assert long.startswith(fitted) and len(fitted) < len(long)
    prompt_ids = generator.decoder.encode(generator.prompt(fitted))
    assert len(prompt_ids) + generator.settings["max_new_tokens"] <= limit
    a, b = generator.classify(long), generator.classify(fitted)
    assert (a.label, a.text, a.generation.token_ids) == (b.label, b.text, b.generation.token_ids)
    got = generator.classify_batch([long, "fine"])  # batched: the same cut
    assert len(got) == 2 and all(g is None or g in generator.labels for g in got)


def test_generate_refuses_a_prompt_beyond_the_context_and_an_empty_one(generator: Generator) -> None:
    with pytest.raises(ValueError, match=r"the model's context is 512 tokens: shorten the prompt"):
        generator.generate("word " * 2000)
    with pytest.raises(ValueError, match="at least one token"):
        generator.generate("")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generator.generate("hello", max_new_tokens=0)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a list"]])
def test_classify_and_generate_refuse_what_is_not_a_string(generator: Generator, bad) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        generator.classify(bad)
    with pytest.raises(TypeError, match="must be a str"):
        generator.generate(bad)


def test_classify_batch_takes_lists_of_any_strings(generator: Generator) -> None:
    assert generator.classify_batch([]) == []
    got = generator.classify_batch(["", "\ud800", "😀", "good"])
    assert len(got) == 4 and all(g is None or g in generator.labels for g in got)
    assert got[1] == generator.classify_batch(["\ufffd"])[0]
    with pytest.raises(TypeError, match="pass \\[text\\]"):
        generator.classify_batch("one text")
    with pytest.raises(ValueError, match="batch_size"):
        generator.classify_batch(["a"], batch_size=0)
