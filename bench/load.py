"""Load on the served app: examples/serve.py in its own process, this one its clients.

    python bench/load.py runs/sst2-minilm/bundle                       # 1, 8 and 32 clients, 60 s each
    python bench/load.py runs/sst2-minilm/bundle --clients 1 8 --seconds 10 --no-docs

Each client is a thread with its own keep-alive connection sending one SST-2 dev sentence per request, back to back.
Per level: requests/s, latency p50/p99, errors (any status other than 200, any connection error), and the CPU
share of this load generator and of the server (of the whole machine: 100% = every core busy), since on a small
machine the clients compete with the server for the same cores. The table goes to docs/reliability.md (between
its load markers) with the machine and the commit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # run from a checkout

from toolchain.blocks import replace_block  # noqa: E402
from toolchain.core.provenance import machine  # noqa: E402


def dev_texts(data_root: Path) -> list[str]:
    import csv

    with (data_root / "sst2" / "dev.tsv").open(newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]


def start_server(bundle: Path, threads: int | None, workers: int) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, str(PROJECT / "examples" / "serve.py"), str(bundle), "--port", "0"]
    command += ["--workers", str(workers)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the line it prints once it listens
    if not line.startswith("serving "):
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def level(port: int, clients: int, seconds: float, texts: list[str], server: psutil.Process) -> dict:
    """`clients` threads sending requests back to back for `seconds`: counts, latencies, CPU shares."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    statuses: dict[int, int] = {}
    failures: dict[str, int] = {}  # connection errors by kind
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        rng = random.Random(i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        while time.perf_counter() < deadline[0]:
            body = json.dumps({"text": rng.choice(texts)})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
                statuses[response.status] = statuses.get(response.status, 0) + 1
            except (OSError, http.client.HTTPException) as e:
                ok = False
                kind = type(e).__name__
                failures[kind] = failures.get(kind, 0) + 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            if ok:
                latencies[i].append((time.perf_counter() - t0) * 1e3)
            else:
                errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    me = psutil.Process()
    cpu0, server0 = me.cpu_times(), server.cpu_times()
    deadline[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1, server1 = me.cpu_times(), server.cpu_times()
    cores = psutil.cpu_count() or 1
    samples = np.array([x for lat in latencies for x in lat])
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": int(samples.size),
        "requests_per_second": samples.size / wall,
        "p50_ms": float(np.percentile(samples, 50)) if samples.size else None,
        "p99_ms": float(np.percentile(samples, 99)) if samples.size else None,
        "errors": sum(errors),
        "statuses": statuses,
        "connection_errors": failures,
        "load_cpu_share": ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / wall / cores,
        "server_cpu_share": ((server1.user + server1.system) - (server0.user + server0.system)) / wall / cores,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| clients | requests/s | vs 8 clients | p50 ms | p99 ms | errors | load generator CPU | server CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    eight = next((r["requests_per_second"] for r in rows if r["clients"] == 8), None)
    for r in rows:
        ratio = f"{r['requests_per_second'] / eight:.2f}x" if eight else ""
        lines.append(
            f"| {r['clients']} | {r['requests_per_second']:.1f} | {ratio} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['errors']} | {100 * r['load_cpu_share']:.0f}% | {100 * r['server_cpu_share']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=None, help="the server's onnxruntime threads")
    parser.add_argument("--workers", type=int, default=1, help="the server's inferences at once")
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("TOOLCHAIN_DATA", PROJECT.parent / "shared" / "data"))
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/reliability.md")
    parser.add_argument("--block", default="load", help="the block of docs/reliability.md to write")
    args = parser.parse_args(argv)
    texts = dev_texts(args.data)
    proc, port = start_server(args.bundle, args.threads, args.workers)
    try:
        server = psutil.Process(proc.pid)
        level(port, 1, min(2.0, args.seconds), texts, server)  # warm-up: first-call allocations
        rows = []
        for n in args.clients:
            rows.append(level(port, n, args.seconds, texts, server))
            r = rows[-1]
            print(
                f"{n:>3} clients: {r['requests_per_second']:.1f} requests/s, p50 {r['p50_ms']:.2f} ms, "
                f"p99 {r['p99_ms']:.2f} ms, errors {r['errors']}, statuses {r['statuses']}, "
                f"connection errors {r['connection_errors']}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    if not args.no_docs:
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        header = (
            f"`examples/serve.py` on `{args.bundle}` (`{manifest['variant']}`, {args.workers} worker(s), "
            f"{args.threads or 'default'} onnxruntime thread(s) each, queue 64), "
            f"{args.seconds:.0f} s per level, clients in `bench/load.py`'s own process; {machine()}; "
            f"{platform.python_implementation()} {platform.python_version()}:"
        )
        command = f"python bench/load.py {args.bundle} --seconds {args.seconds:g} --workers {args.workers}"
        command += f" --threads {args.threads}" if args.threads else ""
        command += f" --block {args.block}" if args.block != "load" else ""
        replace_block(PROJECT / "docs" / "reliability.md", args.block, header + "\n\n" + text, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
