"""GBNF for integers and decimal numbers within bounds (JSON Schema's ``minimum``, ``maximum``,
``exclusiveMinimum``, ``exclusiveMaximum``), digit by digit.

An integer range splits by the number of digits; two numbers of one length split on their first
digit (``[lo, hi]`` = ``lo0 [lo', 9..9] | [lo0+1 .. hi0-1] [0-9]{n-1} | hi0 [0..0, hi']``). A
decimal number within whole-number bounds is an integer part within the bounds followed by a
fraction, with two edges: at an exclusive lower bound the fraction must not be zero; at an
inclusive upper bound it must be.

Numbers are written without an exponent, no leading zeros, and a side without a bound allows up
to :data:`~.gbnf.INT_DIGITS` digits.
"""

from __future__ import annotations

from .gbnf import FRACTION_DIGITS, INT_DIGITS

UNBOUNDED = 10**INT_DIGITS - 1
"""The largest integer written where no bound applies."""


def _digits_range(lo: str, hi: str) -> str:
    """Digit strings of one length from ``lo`` to ``hi`` (``lo <= hi``, leading zeros allowed)."""
    n = len(lo)
    if lo == hi:
        return f'"{lo}"'
    if n == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return f'"{lo[0]}" ( {_digits_range(lo[1:], hi[1:])} )'
    rest = n - 1
    zeros, nines = "0" * rest, "9" * rest
    parts = []
    first, last = int(lo[0]), int(hi[0])
    if lo[1:] != zeros:
        parts.append(f'"{lo[0]}" ( {_digits_range(lo[1:], nines)} )')
        first += 1
    tail = None
    if hi[1:] != nines:
        tail = f'"{hi[0]}" ( {_digits_range(zeros, hi[1:])} )'
        last -= 1
    if first <= last:
        head = f'"{first}"' if first == last else f"[{first}-{last}]"
        parts.append(f"{head} [0-9]{{{rest}}}")
    if tail:
        parts.append(tail)
    return " | ".join(parts)


def natural_range(lo: int, hi: int | None) -> str:
    """Integers ``lo..hi`` (``0 <= lo``; ``hi`` None: no upper bound) without sign or leading zeros,
    as GBNF alternatives ("" when the range is empty)."""
    top = max(UNBOUNDED, lo) if hi is None else hi
    if top < lo:
        return ""
    parts = []
    for n in range(len(str(lo)), len(str(top)) + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = min(top, 10**n - 1)
        if a <= b:
            parts.append(_digits_range(str(a), str(b)))
    return " | ".join(parts)


def integer_range(lo: int | None, hi: int | None) -> str:
    """GBNF alternatives for the integers in ``[lo, hi]`` (None: that side has no bound); "" when
    none. Bounds beyond what an unbounded side allows count as no bound."""
    if lo is not None and lo <= -UNBOUNDED:
        lo = None
    if hi is not None and hi >= UNBOUNDED:
        hi = None
    if lo is not None and hi is not None and lo > hi:
        return ""
    parts = []
    if hi is None or hi >= 0:
        nonneg = natural_range(max(lo, 0) if lo is not None else 0, hi)
        if nonneg:
            parts.append(nonneg)
    if lo is None or lo < 0:
        mag_lo = max(1, -hi) if hi is not None else 1
        neg = natural_range(mag_lo, -lo if lo is not None else None)
        if neg:
            parts.append(f'"-" ( {neg} )')
    return " | ".join(parts)


FRACTION = f'( "." [0-9]{{1,{FRACTION_DIGITS}}} )?'
NONZERO_FRACTION = f'"." [0-9]{{0,{FRACTION_DIGITS - 1}}} [1-9]'
ZERO_FRACTION = '( "." "0" )?'


def _magnitudes(a: int, a_excl: bool, b: int | None, b_excl: bool) -> list[str]:
    """Non-negative decimals ``m`` (integer part, optional fraction) with ``a <= m`` (``<`` when
    ``a_excl``) and ``m <= b`` (``<`` when ``b_excl``; None: no bound), ``0 <= a``."""
    if b is not None and b < a:
        return []
    if b is not None and b == a:
        return [] if a_excl or b_excl else [f'"{a}" {ZERO_FRACTION}']
    parts = []
    start = a
    if a_excl:
        parts.append(f'"{a}" {NONZERO_FRACTION}')
        start = a + 1
    end = None if b is None else b - 1
    whole = natural_range(start, end) if end is None or start <= end else ""
    if whole:
        parts.append(f"( {whole} ) {FRACTION}")
    if b is not None and not b_excl:
        parts.append(f'"{b}" {ZERO_FRACTION}')
    return parts


def number_range(lo: int | None, lo_excl: bool, hi: int | None, hi_excl: bool) -> str:
    """GBNF alternatives for decimal numbers in the bounds (whole numbers; None: no bound on that
    side); "" when none."""
    if lo is not None and lo <= -UNBOUNDED:
        lo, lo_excl = None, False
    if hi is not None and hi >= UNBOUNDED:
        hi, hi_excl = None, False
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_excl):  # the non-negative side
        if lo is None or lo < 0:
            a, a_excl = 0, False
        else:
            a, a_excl = lo, lo_excl
        parts += _magnitudes(a, a_excl, hi, hi_excl)
    if lo is None or lo < 0:  # the negative side: -m with -hi <= m <= -lo
        if hi is None or hi > 0:
            a, a_excl = 0, True  # -0 is 0, already written above
        else:
            a, a_excl = -hi, hi_excl
            if a == 0:
                a_excl = True
        neg = _magnitudes(a, a_excl, None if lo is None else -lo, lo_excl)
        if neg:
            parts.append('"-" ( ' + " | ".join(neg) + " )")
    return " | ".join(parts)
