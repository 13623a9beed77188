"""Jobs run as their own process group: killed whole once they reach a point."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def kill_group_when(proc: subprocess.Popen, reached, timeout_s: float, what: str) -> None:
    """SIGKILL ``proc``'s process group (the job, its Ray and its workers) once ``reached()`` is true.

    Fails if the job ends first or ``what`` does not happen within ``timeout_s``.
    """
    try:
        deadline = time.monotonic() + timeout_s
        while not reached():
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, f"no {what} from the job"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
