"""A request's grammar across the members of a generation (:class:`GrammarTrack`): one
:class:`~.types.Constraint` per active member, each advanced only over committed text, and a
lazy grammar's triggers (docs/grammar.md).

Every member's constraint follows the one shared output. At token granularity (the members
share a vocabulary) a member accepts the tokens the others wrote when it catches up, before
it samples, then its own token once it is committed; at word granularity it accepts the
*bytes* the others wrote (in its own tokens of them: a grammar's state depends only on the
text), then its own tokens. A token that is sampled but not committed (word-level ME's kept
boundary token when another member is drawn) never reaches a grammar.

A lazy grammar (``GrammarSpec.triggers``) leaves the output free until its text contains a
trigger; then every member's constraint is made and fed the text from the trigger's first
byte. If the grammar rejects what was already written after the trigger (the same token
went on past it), the constraints are dropped, a warning is logged, the output stays free
and later text is watched for the next trigger. A trigger is looked for in the output text
only (not the prompt); me-local watches for it itself rather than use llama.cpp's lazy
grammar, whose regex search over the whole text on every token is quadratic in its length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..errors import BackendError, RequestError
from .types import Constraint, GrammarMember, GrammarRejected, GrammarSpec, Member

log = logging.getLogger("me_local.core")


def token_literals(gbnf: str) -> list[str]:
    """The token literals (``<...>``, ``<[id]>``, ``!<...>``) in GBNF text: they name tokens of
    one vocabulary, so members of different vocabularies cannot share them."""
    found: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        ch = gbnf[i]
        if ch in "\"[":  # a string literal or a character class, with backslash escapes
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
            i += 1
        elif ch == "#":
            while i < n and gbnf[i] != "\n":
                i += 1
        elif ch == "<":
            end = gbnf.find(">", i)
            end = n if end < 0 else end + 1
            found.append(gbnf[i:end])
            i = end
        else:
            i += 1
    return found


def check_grammar_members(spec: GrammarSpec, members: Sequence[Member]) -> list[GrammarMember]:
    """``members`` as members that can take a grammar (RequestError naming ``spec.param`` if not)."""
    out = []
    for m in members:
        if not isinstance(m, GrammarMember):
            raise RequestError(f"member {m.name!r} cannot constrain its output to a grammar; drop {spec.param}",
                               param=spec.param)
        out.append(m)
    return out


class GrammarTrack:
    """The constraints of one generation. ``by_bytes``: word granularity (members sync over
    the text's bytes); else token granularity (over the token ids; members share a vocabulary).
    Call :meth:`ready` before member i samples (its constraint, caught up; None while a lazy
    grammar waits for its trigger), :meth:`wrote` once a token is committed, :meth:`close` at
    the end."""

    def __init__(self, spec: GrammarSpec, members: Sequence[Member], active: Sequence[int], *,
                 by_bytes: bool) -> None:
        self.spec = spec
        self._members = check_grammar_members(spec, [members[i] for i in active])
        self._active = list(active)
        self._by_bytes = by_bytes
        self.text = bytearray()
        """The output so far (every committed token's bytes)."""
        self._ids: list[int] = []
        """Token granularity: the tokens committed since the constraints were made."""
        self._pos: dict[int, int] = {}
        """Per member: how much its constraint has accepted (bytes of ``text``, or of ``_ids``)."""
        self._constraints: dict[int, Constraint] = {}
        self._triggers = [t.encode("utf-8") for t in spec.triggers if t]
        self._search = 0
        """Where the next trigger may begin (bytes of ``text``)."""
        self.lazy = bool(self._triggers)
        self._last = -1
        """The member that wrote the last token."""
        self.rejected = 0
        """Triggers whose following text the grammar rejected (the output stayed free)."""
        if not self.lazy:
            self._start(0)

    @property
    def on(self) -> bool:
        """Whether the output is constrained now."""
        return bool(self._constraints)

    def _start(self, offset: int) -> None:
        """Make every member's constraint and feed it ``text[offset:]``."""
        made: dict[int, Constraint] = {}
        try:
            for i, m in zip(self._active, self._members):
                made[i] = m.make_constraint(self.spec)
                made[i].accept_bytes(bytes(self.text[offset:]))
        except BaseException:
            for c in made.values():
                c.close()
            raise
        self._constraints = made
        self._ids = []
        self._pos = {i: (len(self.text) if self._by_bytes else 0) for i in made}

    def ready(self, i: int) -> Constraint | None:
        """Member i's constraint, having accepted everything committed so far (None: free)."""
        c = self._constraints.get(i)
        if c is None:
            return None
        try:
            if self._by_bytes:
                if self._pos[i] < len(self.text):
                    c.accept_bytes(bytes(self.text[self._pos[i]:]))
                    self._pos[i] = len(self.text)
            else:
                for t in self._ids[self._pos[i]:]:
                    c.accept(t)
                    self._pos[i] += 1
        except GrammarRejected as exc:  # the same grammar accepted this text for the writer
            raise BackendError(f"member {self._member_name(i)!r} could not follow the grammar over text "
                               f"another member wrote under it: {exc}") from None
        return c

    def wrote(self, i: int, token: int, piece: bytes) -> None:
        """Member i's sampled ``token`` (its bytes ``piece``) is committed to the output. While
        constrained, i's constraint accepts it (i sampled it from that very state); while a
        lazy grammar waits, the text is searched for a trigger."""
        c = self._constraints.get(i)
        self.text += piece
        self._last = i
        if c is not None:
            try:
                c.accept(token)
            except GrammarRejected as exc:
                raise BackendError(f"the grammar rejected a token it allowed: {exc}") from None
            if self._by_bytes:
                self._pos[i] = len(self.text)
            else:
                self._ids.append(token)
                self._pos[i] = len(self._ids)
        elif self.lazy:
            self._watch(len(piece))

    def _watch(self, new: int) -> None:
        longest = max(len(t) for t in self._triggers)
        lo = max(self._search, len(self.text) - new - longest + 1)
        while True:
            found = [(k, t) for t in self._triggers if (k := self.text.find(t, lo)) >= 0]
            if not found:
                self._search = max(self._search, len(self.text) - longest + 1)
                return
            start, trigger = min(found)
            try:
                self._start(start)
            except GrammarRejected as exc:
                self.rejected += 1
                log.warning("the grammar of %s did not match the text after its trigger %r (%r): the output "
                            "stays free text (%s)", self.spec.param, trigger.decode("utf-8", "replace"),
                            bytes(self.text[start:start + 80]).decode("utf-8", "replace"), exc)
                lo = self._search = start + 1
                continue
            return

    def only_end(self, i: int) -> bool:
        """Whether member i's grammar is complete and allows nothing but the end (the output is done)."""
        c = self.ready(i)
        return c is not None and c.only_end()

    def state(self) -> str:
        """The done event's ``grammar``: complete, incomplete or untriggered."""
        if not self._constraints:
            return "untriggered"
        i = self._last if self._last in self._constraints else next(iter(self._constraints))
        c = self.ready(i)  # the last writer's has accepted everything
        assert c is not None
        return "complete" if c.complete() else "incomplete"

    def no_token(self, member: str) -> RequestError:
        """The error when the grammar allows no token of ``member``'s vocabulary."""
        tail = bytes(self.text[-40:]).decode("utf-8", "replace")
        return RequestError(
            f"the grammar in {self.spec.param} allows no token of member {member!r} after {len(self.text)} bytes "
            f"of output (ending {tail!r}): it asks for text this model has no token for (control tokens are "
            "never written under a grammar); change the grammar", param=self.spec.param)

    def close(self) -> None:
        for c in self._constraints.values():
            c.close()
        self._constraints = {}

    def _member_name(self, i: int) -> str:
        return self._members[self._active.index(i)].name
