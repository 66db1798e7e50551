"""``varcon`` as a user runs it: a new process that starts its own local Ray instance."""
import os
import subprocess
import sys

import pytest
from services import patience

SWEEP_TIMEOUT_S = 600  # on an idle machine (services.patience)


def varcon(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``varcon *args`` in a new process that starts its own local Ray instance (``RAY_ADDRESS=local``: without
    it Ray would join the session's cluster, which runs on this machine); a sweep still running after
    ``patience(SWEEP_TIMEOUT_S)`` is killed (its Ray instance with it) and fails the test with the end of what it
    printed."""
    limit_s = patience(SWEEP_TIMEOUT_S)
    try:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args],
                              env={**os.environ, "RAY_ADDRESS": "local", **(env or {})},
                              capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as hung:
        tail = (hung.stderr or b"")[-4000:]
        pytest.fail(f"`varcon {' '.join(args)}` ran past {limit_s:.0f} s; its output ended with:\n"
                    f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")


def succeeded(done: subprocess.CompletedProcess) -> str:
    """What a finished ``varcon`` printed, after checking it exited 0."""
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout
