"""Transparent huge pages for weights read into memory (``mmap: false``). No llama_cpp here.

llama.cpp reads the weights into a malloc'd buffer of 4 KiB pages. Where THP is
``madvise`` (the common default) such a buffer never gets huge pages, and its decode
speed then depends on where its pages landed: on a 2-core AMD EPYC VM two copies of
SmolLM2-135M Q4_1 read in one process decoded 10.3 and 9.7 ms a token (the first copy
loaded was the slow one, every time), which made ``me-local bench`` report single mode
at 0.86x of the baseline. Collapsing the buffer into huge pages made the copies equal.
So after a read load, :func:`advise_new_anonymous` asks the kernel for huge pages over
the anonymous memory the load added (``MADV_HUGEPAGE``, then ``MADV_COLLAPSE`` to do it
now). Best effort: any failure (another OS, an old kernel, THP ``never``) is ignored.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("me_local.backends")

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE = 2 << 20

Range = tuple[int, int]


def anonymous_ranges(maps_text: str | None = None) -> list[Range]:
    """The anonymous mappings (no file, not [heap]/[stack]) of this process: (start, end)."""
    if maps_text is None:
        if not sys.platform.startswith("linux"):
            return []
        try:
            with open("/proc/self/maps", encoding="ascii") as f:
                maps_text = f.read()
        except OSError:
            return []
    out = []
    for line in maps_text.splitlines():
        fields = line.split()
        if len(fields) == 5:
            start, _, end = fields[0].partition("-")
            out.append((int(start, 16), int(end, 16)))
    return out


def added_ranges(before: list[Range], after: list[Range]) -> list[Range]:
    """The parts of ``after`` that no range of ``before`` covers."""
    out: list[Range] = []
    for a, b in after:
        parts = [(a, b)]
        for c, d in before:
            kept: list[Range] = []
            for x, y in parts:
                if d <= x or c >= y:
                    kept.append((x, y))
                    continue
                if x < c:
                    kept.append((x, c))
                if d < y:
                    kept.append((d, y))
            parts = kept
        out += parts
    return out


def huge_aligned(ranges: list[Range], huge: int = HUGE) -> list[Range]:
    """Each range shrunk to whole huge pages; ranges smaller than one are dropped."""
    out = []
    for a, b in ranges:
        a2, b2 = (a + huge - 1) // huge * huge, b // huge * huge
        if b2 - a2 >= huge:
            out.append((a2, b2))
    return out


def advise_new_anonymous(before: list[Range]) -> int:
    """Ask for huge pages over the anonymous memory added since ``before``; the bytes advised."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    total = 0
    for a, b in huge_aligned(added_ranges(before, anonymous_ranges())):
        if madvise(a, b - a, MADV_HUGEPAGE) != 0:
            continue
        total += b - a
        if madvise(a, b - a, MADV_COLLAPSE) != 0:  # khugepaged will still do it later
            log.debug("MADV_COLLAPSE failed (errno %d); huge pages come later", ctypes.get_errno())
    return total


def load_with_huge_pages(load: Callable[[], T | None], *, read_weights: bool) -> T | None:
    """Run ``load`` (a model load); when it read weights into memory and succeeded, ask for
    huge pages over what it added, right away: before a context exists, whose buffers would
    merge with the weights into one mapping that ``MADV_COLLAPSE`` refuses."""
    before = anonymous_ranges() if read_weights else []
    loaded = load()
    if loaded and read_weights:
        advised = advise_new_anonymous(before)
        log.debug("huge pages asked for %.1f MiB of read weights", advised / 2**20)
    return loaded
