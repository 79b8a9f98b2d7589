"""The one process-per-variant launcher, for every task's bench stage: each variant is measured in a fresh process
of its own (`python -m <module> job.json`), so training or another variant cannot pollute its memory or its load
time, in rounds, with the order rotated so no variant always follows the same neighbour. The child answers JSON
lines on stdout; its stderr goes to a file beside the job (a chatty library must not block it on a full pipe), and a
child that fails is one line (`runlog.child_failed`), its output kept in the run's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolchain.core.runlog import child_failed

SETTLE_SECONDS = 0.05  # between two processes' turns: let the previous one's threads stop spinning


def rotation(names: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) for every variant in every round, each round starting one variant later; the previous
    process's threads get SETTLE_SECONDS to stop before the next one starts."""
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(SETTLE_SECONDS)
            yield r, name


class MeasureProcess:
    """A running measure process for one variant: `ask` sends a JSON request (or none) and reads its answer."""

    def __init__(
        self,
        stage: str,
        name: str,
        module: str,
        job_file: Path,
        threads: int,
        python: str | None = None,
        env: dict[str, str] | None = None,
    ):
        """`python`: another interpreter (a peer's own environment), `env`: variables added for it."""
        self.stage, self.name = stage, name
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        self.log = job_file.with_suffix(".log")
        self.started = time.time()
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [python or sys.executable, "-m", module, str(job_file)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )

    def ask(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise child_failed(self.stage, f"measuring {self.name}", code, self.log.read_text(errors="replace"))
        answer: dict[str, Any] = json.loads(line)
        return answer

    def wait(self) -> None:
        """The child has said its last: let it exit (a clean exit is part of a good measurement)."""
        self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def measure_once(
    stage: str,
    name: str,
    module: str,
    job_file: Path,
    threads: int,
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a measure process that answers once, unasked, as the last line it prints, and exits; return the answer."""
    proc = MeasureProcess(stage, name, module, job_file, threads, python, env)
    try:
        out, _ = proc.proc.communicate()
    finally:
        proc.close()
    lines = out.strip().splitlines()
    if proc.proc.returncode != 0 or not lines:
        raise child_failed(stage, f"measuring {name}", proc.proc.returncode, proc.log.read_text(errors="replace"))
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer
