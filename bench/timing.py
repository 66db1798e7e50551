"""What the CPU bench scripts share: the wall time of one call."""
from __future__ import annotations

import time
from collections.abc import Callable


def timed(function: Callable[[], object]) -> float:
    """Seconds ``function()`` took (``time.perf_counter``)."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started
