"""Launching a multi-process gloo job with ``torch.distributed.run`` from a test, robustly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def launch(args: list[str], nproc: int = 2, timeout: float = 180, cwd: Path | None = None) -> str:
    """Run ``torch.distributed.run --standalone --nproc_per_node nproc ARGS``; return its output.

    One intra-op thread per process; the environment of an enclosing distributed job is cleared; on a timeout
    the whole process group is killed and the test fails with the end of the log.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    cmd += ["--nproc_per_node", str(nproc), "--max-restarts", "0", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{nproc}-process run timed out after {timeout} s:\n{log.decode()[-4000:]}")
    text = log.decode()
    assert proc.returncode == 0, text[-6000:]
    return text
