"""examples/serve.py, the bundle behind HTTP: it answers what the Python runtime answers, refuses what is over its
limits with a clear status, answers 503 when its queue is full and finishes the requests in flight on SIGTERM.

Nothing here waits for time to pass: the test waits for the lines the server prints (listening, holding a request,
draining), each with only an upper bound, and holds the worker busy with the server's SERVE_HOLD hook."""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from toolchain.runtime import Predictor

PROJECT = Path(__file__).resolve().parents[1]
UPPER_BOUND = 120  # seconds: only ever a limit for a line that should come, never a wait for something to happen


class Server:
    def __init__(self, bundle: Path, *args: str, hold: bool = False):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SERVE_HOLD", None)
        if hold:
            env["SERVE_HOLD"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(PROJECT / "examples" / "serve.py"), str(bundle), "--port", "0", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for("serving ")
        self.port = int(line.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<exit>")

    def wait_for(self, prefix: str) -> str:
        seen = []
        while True:
            line = self.lines.get(timeout=UPPER_BOUND)
            if line.startswith(prefix):
                return line
            assert line != "<exit>", f"the server stopped before printing {prefix!r}: {seen}"
            seen.append(line)

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=UPPER_BOUND)
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read() or b"null")
        conn.close()
        return response.status, data, dict(response.getheaders())

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=UPPER_BOUND)


@pytest.fixture(scope="module")
def bundle(first_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, runs, _ = first_run
    folder = tmp_path_factory.mktemp("served") / "bundle"
    shutil.copytree(runs / "tiny" / "bundle", folder)
    return folder


@pytest.fixture
def server(bundle: Path) -> Iterator[Server]:
    s = Server(bundle, "--max-texts", "8", "--max-chars", "2000", "--max-body-bytes", "100000")
    yield s
    s.stop()


def test_answers_equal_the_python_runtime(server: Server, bundle: Path, data_root: Path) -> None:
    from toolchain.data import read_split

    texts = read_split(data_root / "sst2" / "dev.tsv", "sentence", "label", ["negative", "positive"]).texts[:64]
    texts += ["", "\ud800 lone surrogate", "😀 中文"]
    want = Predictor.load(bundle).predict(texts)
    status, health, _ = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["labels"] == ["negative", "positive"]
    for text, p in zip(texts, want, strict=True):
        status, got, _ = server.request("POST", "/predict", {"text": text})
        assert status == 200 and got == {"label": p.label, "score": p.score, "scores": p.scores}
    status, got, _ = server.request("POST", "/predict", {"texts": texts[:8]})
    assert status == 200 and [g["label"] for g in got["predictions"]] == [p.label for p in want[:8]]


@pytest.mark.parametrize(
    "body, raw, status, says",
    [
        ({"texts": ["a"] * 9}, None, 413, "9 texts; at most 8 per request"),
        (None, b"x" * 100_001, 413, "the body is 100001 bytes; at most 100000"),
        ({"text": "a" * 2001}, None, 422, "text 0 has 2001 characters; at most 2000 per text"),
        ({"texts": ["ok", 5]}, None, 422, "text 1 is int, not a string"),
        ({"texts": "not a list"}, None, 422, '"texts" must be a list of strings'),
        ({"nothing": 1}, None, 422, 'send {"text": "..."}'),
        (None, b"{not json", 400, "the body is not JSON"),
    ],
)
def test_requests_over_the_limits_get_a_clear_status(server: Server, body, raw, status, says) -> None:
    got, data, _ = server.request("POST", "/predict", body, raw)
    assert got == status and says in data["error"]
    assert server.request("GET", "/health")[0] == 200  # and the server goes on


def test_a_full_queue_answers_503_with_retry_after_at_once(bundle: Path) -> None:
    server = Server(bundle, "--workers", "1", "--queue", "0", hold=True)
    try:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=server.request("POST", "/predict", {"text": "good"})))
        worker.start()
        server.wait_for("holding request 1")  # the only worker is busy with it
        status, data, headers = server.request("POST", "/predict", {"text": "another"})
        assert status == 503 and headers.get("Retry-After") == "1" and "busy" in data["error"]
        server.release()
        worker.join(timeout=UPPER_BOUND)
        assert first["r"][0] == 200 and first["r"][1]["label"] in ("negative", "positive")
    finally:
        server.stop()


def test_sigterm_finishes_the_request_in_flight_then_exits(bundle: Path) -> None:
    server = Server(bundle, hold=True)
    try:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=server.request("POST", "/predict", {"text": "good"})))
        worker.start()
        server.wait_for("holding request 1")
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_for("draining: ") == "draining: 1 request(s) in flight"
        server.release()
        worker.join(timeout=UPPER_BOUND)
        assert first["r"][0] == 200  # answered, not cut off
        assert server.wait_for("drained: ") == "drained: 1 request(s) served"
        assert server.proc.wait(timeout=UPPER_BOUND) == 0
    finally:
        server.stop()
