"""Long texts in windows that fit the members' contexts, read a chunk at a time.

A text file is read in chunks of :data:`READ_CHARS` and cut into *pieces* that end after
whitespace: paragraphs (a piece ends after a run of whitespace holding a blank line) or,
inside a paragraph longer than :data:`MAX_PIECE_CHARS`, after its last run of whitespace
before that length. The pieces are packed greedily into *windows* of at most ``budget``
tokens for every member (each piece tokenized on its own by each distinct vocabulary; a
piece longer than the budget is halved at the whitespace nearest its middle until its halves
fit). Every byte of the text is in exactly one window, in order, and windows begin after
whitespace, so no word is cut (except in a run of more than a window's tokens without
whitespace, which is cut where it must be).

Each window is scored on its own after the members' BOS: there is no overlap, so a
window's first words are predicted without the text before them (docs/eval.md).
Memory stays bounded by a chunk and a window whatever the file's size.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import UsageError

READ_CHARS = 1 << 20
"""Characters read from a file at a time (about 1 MiB of text)."""
MAX_PIECE_CHARS = 1 << 15
"""A paragraph longer than this is cut at whitespace before being packed into windows."""

_PARAGRAPH_END = re.compile(r"\n[^\S\n]*\n\s*")
"""A run of whitespace holding a blank line (the piece ends after the whole run)."""
_LAST_SPACE = re.compile(r"\s+(?=\S)")

Counter = Callable[[str], Sequence[int]]
"""Tokens of a text for each distinct vocabulary (a window must fit every one)."""


def read_text(path: str | Path, chunk_chars: int = READ_CHARS) -> Iterator[str]:
    """A UTF-8 text file in chunks of about ``chunk_chars`` characters (bounded memory).
    A UsageError names a file that cannot be read, or its first byte that is not UTF-8."""
    p = Path(path)
    try:
        f = p.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {str(p)!r} ({exc.strerror or exc}); check the path") from None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with f:
        while True:
            data = f.read(chunk_chars)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise UsageError(f"{p}: byte {offset + exc.start} is not UTF-8 text; "
                                 "convert the file to UTF-8 (e.g. with iconv)") from None
            offset += len(data)
            if text:
                yield text
            if not data:
                return


def pieces(chunks: Iterable[str], max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """Cut a text given in chunks into pieces that end after whitespace: paragraphs, and in
    a paragraph longer than ``max_chars``, runs of words. A run of more than ``max_chars``
    characters without whitespace is cut at ``max_chars``. The pieces join to the text."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        while True:
            cut = _cut(buf, max_chars, final=False)
            if cut is None:
                break
            yield buf[:cut]
            buf = buf[cut:]
    while buf:
        cut = _cut(buf, max_chars, final=True)
        assert cut is not None and cut > 0
        yield buf[:cut]
        buf = buf[cut:]


def _cut(buf: str, max_chars: int, *, final: bool) -> int | None:
    """Where the first piece of ``buf`` ends, or None to wait for more text."""
    m = _PARAGRAPH_END.search(buf, 0, max_chars + 1)  # a break that begins within max_chars
    if m is not None:
        m = _PARAGRAPH_END.match(buf, m.start())  # with its whole run of whitespace
    if m is not None and (m.end() < len(buf) or final):  # the run is complete
        return m.end()
    if len(buf) <= max_chars:
        return len(buf) if final and buf else None
    last = None
    for last in _LAST_SPACE.finditer(buf, 0, max_chars):  # noqa: B007 (the last match is wanted)
        pass
    return last.end() if last is not None and last.end() > 0 else max_chars


def split_half(text: str) -> tuple[str, str]:
    """Cut ``text`` in two after the run of whitespace nearest its middle (in the middle when
    it has none): both halves non-empty for any text of two or more characters."""
    mid = len(text) // 2
    best = None
    for m in _LAST_SPACE.finditer(text):
        end = m.end()
        if 0 < end < len(text) and (best is None or abs(end - mid) < abs(best - mid)):
            best = end
    at = best if best is not None else max(1, mid)
    return text[:at], text[at:]


def windows(parts: Iterable[str], count: Counter, budget: int) -> Iterator[str]:
    """Pack pieces of text into windows of at most ``budget`` tokens for each vocabulary that
    ``count`` counts (by the sum of the pieces' counts; tokenizing the joined text may differ
    by a token or two at each join, which the caller's margin and its halving on overflow
    cover). A piece over the budget alone is halved until its parts fit."""
    if budget < 1:
        raise ValueError("a window needs room for at least one token")
    cur: list[str] = []
    used: list[int] | None = None
    for piece in parts:
        for part, c in fit(piece, count, budget):
            if used is not None and any(u + x > budget for u, x in zip(used, c)):
                yield "".join(cur)
                cur, used = [], None
            cur.append(part)
            used = list(c) if used is None else [u + x for u, x in zip(used, c)]
    if cur:
        yield "".join(cur)


def fit(text: str, count: Counter, budget: int) -> Iterator[tuple[str, Sequence[int]]]:
    """``text`` in order, halved (:func:`split_half`) until each part is at most ``budget``
    tokens for every vocabulary, with each part's counts."""
    stack = [text]
    while stack:
        t = stack.pop()
        c = count(t)
        if max(c, default=0) <= budget or len(t) < 2:
            yield t, c
            continue
        a, b = split_half(t)
        stack.extend((b, a))
