"""Waiting for a quiet CPU before a measurement (the scripts in scripts/ that time one
call at a time use it; a shared machine's other jobs otherwise show up in the figures)."""

from __future__ import annotations

import time


def cpu_idle(seconds: float = 1.0) -> float:
    """The fraction of CPU time idle machine-wide over ``seconds`` (1.0 where /proc/stat is missing)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        return sum(values), values[3] + values[4]

    try:
        t1, i1 = read()
        time.sleep(seconds)
        t2, i2 = read()
    except OSError:
        return 1.0
    return (i2 - i1) / max(1, t2 - t1)


def wait_quiet(limit_s: float, threshold: float = 0.9) -> bool:
    """Wait (up to ``limit_s``) until other processes leave the CPU idle; False if they never did."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if cpu_idle() >= threshold:
            return True
    return False
