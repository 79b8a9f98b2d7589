"""`toolchain run RECIPE --nproc N`: the run in N processes under torch's elastic launcher, the way
`torchrun --standalone --nproc-per-node=N -m toolchain run RECIPE` starts it, with a failed rank summarized in one
line instead of the launcher's traceback (torchrun itself still works: every rank reads WORLD_SIZE/RANK)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def launch(nproc: int, argv: list[str], run_dir: Path) -> int:
    """Start `python -m toolchain <argv>` in `nproc` processes on this machine; the exit code of the first rank that
    failed (1 when it was killed by a signal), 0 when all succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "toolchain", *argv])
    # the launcher's own records (rendezvous, "failed (exitcode: 1)", the closing signals it sends) say less than
    # the one line below and the ranks' own messages
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"killed by {failure.signal_name()}"
        print(
            f"error: rank {rank} of {nproc} failed ({how}); its error is above, each rank's log is in "
            f"{run_dir / 'logs'}; completed stages are kept, run the same command again to resume",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
