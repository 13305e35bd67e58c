"""procs: ending a child process that may still run -- for the test helpers and the bench.

What it knows: subprocess.Popen and signals. Nothing of cssfs, mounts or pytest.
"""

from __future__ import annotations

import subprocess
from typing import Any


def end_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; the child is reaped. Only ``proc``, by pid."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
