"""Peer rows of the generation recipe (onnxruntime-genai, llama.cpp) without building the peers: their environments
are faked under $TOOLCHAIN_CACHE (an interpreter that is this one with stand-in onnxruntime_genai and llama_cpp
packages, a stand-in converter), so the plumbing runs for real: the peer stage builds through the peer's tool, the
answers come from the peer's runtime in a process of that environment, fed the toolchain's prompt ids, the timing
rounds include the peers, and the report compares the shipped decoder with each; a peer is never shipped, and one
whose environment cannot be built is a skip line, not a failed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_generation_recipe, write_recipe
from fake_peers import fake_environment

from toolchain.llm import peers


@pytest.fixture
def peer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(cache))
    return cache


def test_peer_rows_are_built_measured_and_compared_never_shipped(
    tiny_chat_llama: Path, tmp_path: Path, peer_cache: Path
) -> None:
    from toolchain.cli import main

    fake_environment(peer_cache, peers.GENAI)
    fake_environment(peer_cache, peers.LLAMA)
    recipe = tiny_generation_recipe(tiny_chat_llama)
    recipe["generation"]["peers"] = ["ort-genai-int4", "llama.cpp-q4_0", "llama.cpp-q4_k_m"]
    recipe["compile"]["quantize"] = recipe["compile"]["quantize"][1:2]  # one variant of ours is enough here
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path), "--runs", str(tmp_path / "runs")]) == 0
    report = json.loads((tmp_path / "runs" / "tiny-gen" / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    for name, word in (("ort-genai-int4", 1), ("llama.cpp-q4_0", 0), ("llama.cpp-q4_k_m", 0)):
        row = rows[name]
        assert row["peer"] and row["unparsed"] == 0 and row["decode_tokens_per_second"] > 0
        # the stand-in answers one label word for every row: accuracy is that label's share of the eval rows
        share = json.loads(next((tmp_path / "runs" / "tiny-gen" / "stages").glob(f"llm-evaluate.{name}-*/answers.json"))
                           .read_text())  # fmt: skip
        assert set(share) == {["negative", "positive"][word]}
        assert report["verdicts"][name].startswith("peer")
        timed = json.loads(next((tmp_path / "runs" / "tiny-gen" / "stages").glob("llm-bench-*/bench.json")).read_text())
        passes = timed["variants"][name]["decode_tokens_per_second_passes"]
        assert [len(p) for p in passes] == [recipe["generation"].get("bench_passes", 2)]  # one round, each pass kept
        assert timed["variants"][name]["decode_tokens_per_second_rounds"] == [max(p) for p in passes]  # the fastest
        compared = report["peers"][name]
        assert len(compared["decode_ratio_rounds"]) == 1 and compared["decode_ratio_lowest"] > 0
    assert report["shipped"] not in report["peers"] and not rows[report["shipped"]].get("peer")
    assert "## Against the peers" in (tmp_path / "runs" / "tiny-gen" / "report.md").read_text()


def test_a_peer_that_cannot_be_built_is_a_skip_line(
    tiny_chat_llama: Path, tmp_path: Path, peer_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolchain.cli import main

    fake_environment(peer_cache, peers.GENAI, broken=True)

    def no_registry(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> None:
        raise RuntimeError(f"{cmd[0]} failed (1): no network; log {logfile}")

    monkeypatch.setattr(peers, "_run", no_registry)
    recipe = tiny_generation_recipe(tiny_chat_llama, "tiny-skip")
    recipe["generation"]["peers"] = ["ort-genai-int4"]
    recipe["compile"]["quantize"] = []
    assert main(["run", str(write_recipe(tmp_path, recipe)), "--runs", str(tmp_path / "runs")]) == 0
    report = json.loads((tmp_path / "runs" / "tiny-skip" / "report.json").read_text())
    assert "ort-genai-int4" not in {r["name"] for r in report["variants"]}
    assert "could not be built" in report["skipped"]["ort-genai-int4"]
    assert "- ort-genai-int4: skipped:" in (tmp_path / "runs" / "tiny-skip" / "report.md").read_text()
    assert not (peer_cache / "peers" / peers.GENAI / "stamp.json").exists()  # nothing left that looks ready


def test_the_llama_build_asks_for_this_cpus_features_only() -> None:
    args = peers.cmake_args()
    assert args.startswith("-DGGML_NATIVE=OFF")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    assert ("-DGGML_AVX2=ON" in args) == (" avx2" in flags)
    assert ("-DGGML_AVX512=ON" in args) == (" avx512f" in flags)
