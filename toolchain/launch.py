"""`toolchain run RECIPE --nproc N`: the run in N processes under torch's elastic launcher, the way
`torchrun --standalone --nproc-per-node=N -m toolchain run RECIPE` starts it, with a failed rank summarized in one
line instead of the launcher's traceback (torchrun itself still works: every rank reads WORLD_SIZE/RANK)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from toolchain.core import runlog


def launch(nproc: int, argv: list[str], run_dir: Path) -> int:
    """Start `python -m toolchain <argv>` in `nproc` processes on this machine; the exit code of the first rank that
    failed (1 when it was killed by a signal), 0 when all succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "toolchain", *argv])
    # the launcher's own records (rendezvous, "failed (exitcode: 1)", the closing signals it sends) say less than
    # the one line below and the ranks' own messages
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    started = time.time_ns()
    try:
        run(args)
    except ChildFailedError as e:
        # The rank that failed first is the cause; the others stop because it did (a closed connection, the
        # launcher's SIGTERM), and the exit code the launcher saw may be that SIGTERM's: each rank notes its own.
        first = runlog.first_failure(run_dir / "logs", started)
        if first is not None:
            rank, code, why = first["rank"], first["exit_code"], f": {first['error']}"
        else:  # killed before it could say (SIGKILL, out of memory)
            rank, failure = e.get_first_failure()
            code = failure.exitcode if failure.exitcode > 0 else 1
            why = (
                f" (exit code {failure.exitcode})" if failure.exitcode >= 0 else f" (killed by {failure.signal_name()})"
            )
        print(
            f"error: rank {rank} of {nproc} failed first{why}; each rank's log is in {run_dir / 'logs'}",
            file=sys.stderr,
        )
        return code
    return 0
