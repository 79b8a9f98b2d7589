"""A bundle behind a small HTTP endpoint, with the limits a service needs: the Python standard library, numpy,
onnxruntime and tokenizers (toolchain/runtime.py), no torch, no web framework.

    python examples/serve.py runs/sst2-minilm/bundle                 # http://127.0.0.1:8000
    curl -s localhost:8000/health
    curl -s localhost:8000/predict -d '{"text": "a gorgeous, witty, seductive movie"}'
    curl -s localhost:8000/predict -d '{"texts": ["great", "dreadful"]}'

- Binds 127.0.0.1 unless --host says otherwise; loads the bundle once, checking every file's sha256.
- `POST /predict` takes {"text": str} (answers {"label", "score", "scores"}) or {"texts": [str, ...]} (answers
  {"predictions": [...]}, in order). A body over --max-body-bytes is 413, more texts than --max-texts 413, a text
  over --max-chars characters 422, anything that is not that JSON 400/422, each with {"error": "..."}.
- At most --workers inferences run at once and --queue more wait; beyond that a request is answered 503 with
  Retry-After at once instead of piling up.
- SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, exit 0 ("drained").

It prints `serving <bundle> on http://HOST:PORT` once it listens (with --port 0 the port the system chose).
SERVE_HOLD=1 is a test hook: every inference waits for a line on stdin after printing `holding request N`, so a
test can hold the worker busy exactly as long as it needs, with no timing involved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from toolchain.runtime import BundleError, Predictor


class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Service:
    """The predictor, its limits and the admission count (in flight + waiting)."""

    def __init__(self, predictor: Predictor, args: argparse.Namespace):
        self.predictor = predictor
        self.args = args
        self.slots = threading.BoundedSemaphore(args.workers)
        self.lock = threading.Lock()
        self.admitted = 0  # requests running or waiting for a slot
        self.served = 0
        self.hold = os.environ.get("SERVE_HOLD") == "1"

    def texts(self, body: bytes) -> tuple[list[str], bool]:
        """The texts of a request body and whether it asked for one ({"text": ...})."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Refused(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {e}") from None
        if not isinstance(data, dict) or len({"text", "texts"} & set(data)) != 1:
            raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, 'send {"text": "..."} or {"texts": ["...", ...]}')
        single = "text" in data
        texts = [data["text"]] if single else data["texts"]
        if not isinstance(texts, list):
            raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, '"texts" must be a list of strings')
        if len(texts) > self.args.max_texts:
            raise Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(texts)} texts; at most {self.args.max_texts} per request"
            )
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, f"text {i} is {type(t).__name__}, not a string")
            if len(t) > self.args.max_chars:
                raise Refused(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"text {i} has {len(t)} characters; at most {self.args.max_chars} per text",
                )
        return texts, single

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        with self.lock:
            if self.admitted >= self.args.workers + self.args.queue:
                raise Refused(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"busy: {self.admitted} requests in flight or waiting; retry shortly",
                    {"Retry-After": "1"},
                )
            self.admitted += 1
            self.served += 1
            number = self.served
        try:
            with self.slots:
                if self.hold:
                    print(f"holding request {number}", flush=True)
                    sys.stdin.readline()
                predictions = self.predictor.predict(texts)
        finally:
            with self.lock:
                self.admitted -= 1
        return [{"label": p.label, "score": p.score, "scores": p.scores} for p in predictions]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # the headers and the body go out as two writes: with Nagle's algorithm on, the second waits for the client's
    # delayed ACK of the first (40 ms on Linux), which was 90% of a request's time
    disable_nagle_algorithm = True
    server_version = "edge-toolchain-serve"
    timeout = 30  # an idle keep-alive connection is closed after this many seconds (and at shutdown)
    service: Service

    def setup(self) -> None:
        super().setup()
        with connections_lock:
            connections.add(self.connection)

    def finish(self) -> None:
        with connections_lock:
            connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if self.service.args.access_log:
            super().log_message(format, *args)

    def send(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path != "/health":
            self.send(HTTPStatus.NOT_FOUND, {"error": "GET /health, POST /predict"})
            return
        m = self.service.predictor.manifest
        self.send(
            HTTPStatus.OK,
            {
                "status": "draining" if draining.is_set() else "ok",
                "bundle": m["name"],
                "variant": m["variant"],
                "labels": self.service.predictor.labels,
            },
        )

    def do_POST(self) -> None:
        try:
            if self.path != "/predict":
                raise Refused(HTTPStatus.NOT_FOUND, "POST /predict")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
            if int(length) > self.service.args.max_body_bytes:
                self.close_connection = True  # the body is not read
                raise Refused(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the body is {length} bytes; at most {self.service.args.max_body_bytes}",
                )
            texts, single = self.service.texts(self.rfile.read(int(length)))
            predictions = self.service.predict(texts)
        except Refused as e:
            self.send(e.status, {"error": str(e)}, e.headers)
            return
        self.send(HTTPStatus.OK, predictions[0] if single else {"predictions": predictions})


draining = threading.Event()
connections: set[socket.socket] = set()
connections_lock = threading.Lock()


def close_idle_reads() -> None:
    """At shutdown: end every open connection's reading side, so a keep-alive connection waiting for its next
    request closes now; a request in flight still writes its answer."""
    with connections_lock:
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="a bundle folder (runs/<recipe>/bundle)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per inference")
    parser.add_argument("--workers", type=int, default=1, help="inferences at once (each uses --threads)")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait for a worker; more: 503")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-texts", type=int, default=64, help="texts per request")
    parser.add_argument("--max-chars", type=int, default=10_000, help="characters per text")
    parser.add_argument("--access-log", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    try:
        predictor = Predictor.load(args.bundle, threads=args.threads)  # every file's sha256 checked
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Handler.service = Service(predictor, args)
    ThreadingHTTPServer.request_queue_size = 128  # the listen backlog (socketserver's default, 5, drops clients)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = False  # server_close() waits for the requests in flight
    host, port = server.server_address[:2]

    def stop(signum: int, frame: object) -> None:
        if not draining.is_set():
            draining.set()
            print(f"draining: {Handler.service.admitted} request(s) in flight", flush=True)
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving {args.bundle} on http://{host}:{port}", flush=True)
    server.serve_forever()
    close_idle_reads()
    server.server_close()  # joins every request thread: the ones in flight finish and are answered
    print(f"drained: {Handler.service.served} request(s) served", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
