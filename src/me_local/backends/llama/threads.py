"""How many CPU threads a decode gets: this process's CPUs, and their division between
generations that decode at the same time (:class:`CpuShare`). No llama_cpp here."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_threads() -> int:
    return max(1, min(available_cpus(), 8))


class CpuShare:
    """Divides the CPU threads between generations that decode at the same time.

    llama.cpp's CPU backend gives every calling thread its own team of ``n_threads``
    workers, which spin at each of a graph's barriers. Two slots decoding at once with
    all cores each oversubscribe the cores, and both then run slower than one slot alone
    (measured: docs/performance.md, "concurrent slots oversubscribing the cores"). So a
    decode asks for its threads here: every OS thread that decoded within the last
    ``window`` seconds counts as an active generation (a generation runs on one thread;
    the members of a slot take turns on it, so they count once), and each gets
    ``cores // active`` threads (at least 1, at most what it asked for).
    """

    def __init__(self, cores: int | None = None, window: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cores = cores or default_threads()
        self.window = window
        self._clock = clock
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()

    def threads_for(self, wanted: int) -> int:
        now = self._clock()
        with self._lock:
            self._last[threading.get_ident()] = now
            for ident in [i for i, t in self._last.items() if now - t > self.window]:
                del self._last[ident]
            active = len(self._last)
        return max(1, min(wanted, self.cores // active))

    @property
    def active(self) -> int:
        now = self._clock()
        with self._lock:
            return sum(1 for t in self._last.values() if now - t <= self.window)
