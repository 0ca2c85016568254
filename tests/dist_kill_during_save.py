"""Run ``onepeace ARGS`` under torchrun, SIGKILLing rank 0 inside the checkpoint of update STEP just before its
marker is written (every rank's shards are on disk by then): ``dist_kill_during_save.py STEP ARGS...``."""

from __future__ import annotations

import os
import signal
import sys

import onepeace.train.checkpoint as checkpoint
from onepeace.cli import main


def _main() -> int:
    kill_at = int(sys.argv[1])
    write_marker = checkpoint.write_marker

    def dying_marker(step_dir, step, layout, world_size=1):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        write_marker(step_dir, step, layout, world_size)

    checkpoint.write_marker = dying_marker
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(_main())
