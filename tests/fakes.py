"""Fake members for the pure core's unit tests: deterministic logits that
depend on the member's seed and the last token in its cache, a record of every
evaluate() call, and a scripted mode that emits fixed byte pieces. Also fake
members the engine can serve (``FakeFactory``), whose tokenization can be held."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from me_local import chat_templates
from me_local.core import Cancelled, GrammarSpec, SamplingParams
from me_local.core.sampling import NumpySampler
from me_local.core.types import GrammarRejected
from me_local.errors import RequestError
from me_local.fim import FimTokens


class Dfa:
    """A deterministic automaton over bytes: a tiny stand-in for a GBNF grammar."""

    def __init__(self, start: int, edges: dict[int, dict[bytes, int]], accepting: set[int]) -> None:
        self.start = start
        self.edges = {s: {b[0]: t for chars, t in row.items() for b in (bytes([c]) for c in chars)}
                      for s, row in edges.items()}
        self.accepting = accepting

    def walk(self, state: int | None, data: bytes) -> int | None:
        """The state after ``data`` (None: rejected)."""
        for b in data:
            if state is None:
                return None
            state = self.edges.get(state, {}).get(b)
        return state

    def matches(self, data: bytes, *, whole: bool = False) -> bool:
        """Whether ``data`` is a prefix of the language (``whole``: in it)."""
        end = self.walk(self.start, data)
        return end is not None and (not whole or end in self.accepting)


_BODY = {1: {b"b ": 1, b"a": 2, b"c": 3, b"}": 4}, 2: {b"b ": 1, b"c": 3, b"}": 4}, 3: {b"b": 1}}
LETTERS = b"abc"
FAKE_GRAMMARS: dict[str, Dfa] = {
    # "{" then a, b, c and spaces with no "aa", every "c" followed by "b", then "}"
    "braces": Dfa(0, {0: {b"{": 1}, **_BODY}, {4}),
    # the same without the "{"
    "body": Dfa(1, _BODY, {4}),
    # words of a, b, c separated by single spaces
    "words": Dfa(0, {0: {LETTERS: 1}, 1: {LETTERS: 1, b" ": 2}, 2: {LETTERS: 1}}, {1}),
    # lines of a, b, c, each ending with a newline
    "lines": Dfa(0, {0: {LETTERS: 1}, 1: {LETTERS: 1, b"\n": 2}, 2: {LETTERS: 1}}, {2}),
    # "c", then a and b
    "c-then-ab": Dfa(0, {0: {b"c": 1}, 1: {b"ab": 1}}, {1}),
    # FakeMember's default pieces with an even number: "<0>", "<2>", ... "<10>"
    "even": Dfa(0, {0: {b"<": 1}, 1: {b"02468": 2, b"1": 3}, 3: {b"0": 2}, 2: {b">": 0}}, {0}),
    # a byte no fake piece has
    "impossible": Dfa(0, {0: {b"Z": 1}}, {1}),
}
"""The grammars fake members understand, by GrammarSpec.gbnf."""
ANY_TEXT = Dfa(0, {0: {bytes(range(256)): 0}}, {0})
"""Every text: what fake members make of the grammar of tool calls."""


class FakeConstraint:
    """The core's Constraint over a fake member's pieces, from a :class:`Dfa`: a token is
    allowed when its piece is non-empty and the automaton can read it; the end token when the
    state is accepting. It records what it accepted (``accepted``: bytes) and how often the
    whole-vocabulary mask was asked for (``masks``)."""

    def __init__(self, dfa: Dfa, pieces: Sequence[bytes], eog: int | None) -> None:
        self.dfa = dfa
        self.pieces = pieces
        self.eog = eog
        self.state = dfa.start
        self.accepted = b""
        self.masks = 0
        self.checked = 0
        self.closed = False

    def _ok(self, t: int) -> bool:
        if t == self.eog:
            return self.state in self.dfa.accepting
        return bool(self.pieces[t]) and self.dfa.walk(self.state, self.pieces[t]) is not None

    def allowed(self, ids):
        assert not self.closed
        self.checked += len(ids)
        return np.array([self._ok(int(t)) for t in ids], dtype=bool)

    def mask(self):
        assert not self.closed
        self.masks += 1
        return np.array([self._ok(t) for t in range(len(self.pieces))], dtype=bool)

    def accept(self, token: int) -> None:
        assert not self.closed
        if token == self.eog or not self._ok(token):
            raise GrammarRejected(f"token {token} ({self.pieces[token]!r}) rejected after {self.accepted!r}")
        self.accept_bytes(self.pieces[token])

    def accept_bytes(self, data: bytes) -> None:
        assert not self.closed
        state = self.dfa.walk(self.state, data)
        if state is None:
            raise GrammarRejected(f"{data!r} rejected after {self.accepted!r}")
        self.state = state
        self.accepted += data

    def complete(self) -> bool:
        return self.state in self.dfa.accepting

    def only_end(self) -> bool:
        return self.complete() and not any(self._ok(t) for t in range(len(self.pieces)) if t != self.eog)

    def close(self) -> None:
        self.closed = True


class FakeMember:
    def __init__(
        self,
        name: str,
        seed: int,
        n_vocab: int = 12,
        n_ctx: int = 64,
        pieces: Sequence[bytes] | None = None,
        eog: int | None = None,
        scale: float = 2.0,
        script: Sequence[int] | None = None,
    ) -> None:
        self.name = name
        self._n_vocab = n_vocab
        self._n_ctx = n_ctx
        self._table = np.random.default_rng(seed).normal(0.0, scale, size=(n_vocab + 1, n_vocab))
        self._cached: list[int] = []
        self.calls: list[list[int]] = []
        self.pieces = list(pieces) if pieces is not None else [f"<{i}>".encode() for i in range(n_vocab)]
        self.eog_id = eog
        self.script = list(script) if script is not None else None
        self.cancel_after_chunks: int | None = None

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def cached(self) -> Sequence[int]:
        return self._cached

    def truncate(self, n: int) -> None:
        del self._cached[n:]

    def evaluate(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None) -> None:
        tokens = list(tokens)
        assert tokens, "evaluate() called with nothing to do"
        assert len(self._cached) + len(tokens) <= self._n_ctx, "context overflow"
        self.calls.append(tokens)
        for chunk_start in range(0, len(tokens), 4):  # chunks of 4, cancellable between them
            if cancel is not None and cancel():
                raise Cancelled
            self._cached.extend(tokens[chunk_start : chunk_start + 4])

    def evaluate_rows(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None):
        """Scoring (core.scoring.ScoringMember): the current row, then each token's row in
        chunks of 4 (``row_chunks`` records the chunk sizes), cancellable between chunks."""
        tokens = list(tokens)
        assert len(self._cached) + len(tokens) <= self._n_ctx, "context overflow"
        self.calls.append(tokens)
        yield self.logits()[None, :]
        for chunk_start in range(0, len(tokens), 4):
            if cancel is not None and cancel():
                raise Cancelled
            rows = []
            for t in tokens[chunk_start : chunk_start + 4]:
                self._cached.append(t)
                rows.append(self.logits())
            yield np.array(rows)

    @property
    def word_start(self) -> np.ndarray:
        """Tokens whose piece begins with whitespace, and the end token."""
        ws = np.array([p[:1] in (b" ", b"\n", b"\t", b"\r") for p in self.pieces])
        if self.eog_id is not None:
            ws[self.eog_id] = True
        return ws

    @property
    def eog(self) -> np.ndarray:
        out = np.zeros(self._n_vocab, dtype=bool)
        if self.eog_id is not None:
            out[self.eog_id] = True
        return out

    def logits(self) -> np.ndarray:
        if self.script is not None:
            # scripted: the next token is script[number of generated-looking tokens]
            out = np.full(self._n_vocab, -50.0)
            step = len(self._cached) - self.script_offset
            out[self.script[min(step, len(self.script) - 1)]] = 50.0
            return out
        last = self._cached[-1] if self._cached else self._n_vocab
        return self._table[last]

    script_offset = 0

    def make_sampler(self, params: SamplingParams, seed: int) -> NumpySampler:
        return NumpySampler(self.logits, params, seed)

    constraints: list[FakeConstraint]

    def make_constraint(self, spec: GrammarSpec) -> FakeConstraint:
        """A :class:`FakeConstraint` for one of :data:`FAKE_GRAMMARS` (named by ``spec.gbnf``)."""
        dfa = FAKE_GRAMMARS.get(spec.gbnf)
        if dfa is None and spec.param == "tools":
            # fakes cannot read GBNF: a tool call's grammar lets them write anything (the grammar itself
            # is tested on real models, tests/test_tools_models.py)
            dfa = ANY_TEXT
        if dfa is None:
            raise RequestError(f"the grammar in {spec.param} is not one the fakes know", param=spec.param)
        c = FakeConstraint(dfa, self.pieces, self.eog_id)
        self.__dict__.setdefault("constraints", []).append(c)
        return c

    def is_eog(self, token: int) -> bool:
        return token == self.eog_id

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token]


def scripted(name: str, pieces: Sequence[bytes], script: Sequence[int], prompt_len: int, **kw) -> FakeMember:
    m = FakeMember(name, 0, n_vocab=len(pieces), pieces=pieces, script=script, **kw)
    m.script_offset = prompt_len
    return m


class EngineMember(FakeMember):
    """A FakeMember with what the engine needs besides the core protocol: a model
    fingerprint, prompts (each byte of the text is a token, modulo the vocabulary)
    and close(). Tokenizing goes through the factory, which may hold it. With the
    factory's ``fim``, its model has FIM tokens (the last three ids: prefix, suffix, middle)."""

    def __init__(self, name: str, factory: FakeFactory, chat_template: str | None = None, **kw: Any) -> None:
        super().__init__(name, 0, **kw)
        n = self.n_vocab
        fim = FimTokens(pre=n - 3, suf=n - 2, mid=n - 1) if factory.fim else FimTokens()
        self.model = SimpleNamespace(fingerprint="fake", path=Path(f"{name}.gguf"), bos=-1, eos=-1, add_bos=False,
                                     fim=fim, token_texts=self.pieces, tokenize=self._model_tokenize,
                                     template=lambda configured=None: chat_templates.choose(configured, None),
                                     n_ctx_train=factory.n_ctx_train, weights_bytes=1000, offloaded=0.0)
        self.system: str | None = None
        self.chat_template: str | None = chat_template
        self._factory = factory
        self.closed = False

    def raw_prompt(self, text: str) -> list[int]:
        self._factory.tokenizing(text)
        return [b % self.n_vocab for b in text.encode()]

    def chat_prompt(self, messages: Sequence[dict[str, Any]], *, tools: Any = None, labels: Any = None) -> list[int]:
        """Each message's content, one after another (``prompts`` records what it was given)."""
        self._factory.prompts.append((list(messages), tools))
        return self.raw_prompt("".join(m["content"] for m in messages))

    def tokenize_text(self, text: str) -> list[int]:
        """A continuation's tokens: each byte (as :meth:`raw_prompt`, not held by the gate)."""
        return [b % self.n_vocab for b in text.encode()]

    def _model_tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """The model's tokenizer (FIM prompts): each byte, as :meth:`raw_prompt`, not held by the gate."""
        return [b % self.n_vocab for b in text.encode()]

    @property
    def memory_bytes(self) -> int:
        return 0 if self.closed else 10 * self._n_ctx

    def resize(self, n_ctx: int) -> None:
        """A new context (the cache starts empty), as a llama.cpp member's; ``factory.resized`` records it."""
        self._factory.resized.append((self.name, n_ctx))
        self._n_ctx = n_ctx
        self._cached = []

    def close(self) -> None:
        self.closed = True


class FakeFactory:
    """An engine member factory of EngineMembers (the seam the real llama.cpp factory plugs
    into, as simonw/llm's MockModel stands in for a model). Each member's context is ``n_ctx``
    tokens, or its ensemble's ``n_ctx`` when that is None. ``tokenized`` lists the texts
    tokenized so far; while ``gate`` is set to an unset Event, tokenizing waits for it (only
    for the texts in ``held``, when that is set)."""

    def __init__(self, n_ctx: int | None = 256, *, fim: bool = False, n_ctx_train: int = 0) -> None:
        self.n_ctx = n_ctx
        self.fim = fim
        self.n_ctx_train = n_ctx_train
        """The models' trained context (0: unknown, no limit)."""
        self.resized: list[tuple[str, int]] = []
        self.gate: threading.Event | None = None
        self.held: set[str] | None = None
        self.tokenized: list[str] = []
        self.prompts: list[tuple[list[dict[str, Any]], Any]] = []
        """Each chat prompt's messages and tools, in order."""
        self.embed_gate: threading.Event | None = None
        """Given to the embedding contexts made while it is set: they embed once it is set."""
        self.embedders: list[FakeEmbedder] = []
        self._lock = threading.Lock()

    def __call__(self, mc: Any, ens: Any) -> EngineMember:
        return EngineMember(mc.name, self, chat_template=mc.chat_template, n_ctx=self.n_ctx or ens.n_ctx)

    def embedder(self, mc: Any, ens: Any) -> FakeEmbedder:
        made = FakeEmbedder(mc.name, n_ctx=self.n_ctx or ens.n_ctx, gate=self.embed_gate)
        self.embedders.append(made)
        return made

    def tokenizing(self, text: str) -> None:
        with self._lock:
            self.tokenized.append(text)
        if self.gate is not None and (self.held is None or text in self.held):
            assert self.gate.wait(60), "the test never opened the tokenizer gate"


class WordFake(FakeMember):
    """A FakeMember with a vocabulary of its own, for word-level ME: single characters of
    ``alphabet``, then ``words`` (multi-character pieces such as ``b" bad"``), then the other
    bytes (for tokenizing any text; never sampled), then an end-of-generation token.
    Tokenizing continuation text is greedy longest match; the word-start mask comes from
    the pieces (whitespace-initial, or the end token). Logits
    depend only on the last token, as FakeMember's; ``boundary_bias`` is added to the
    whitespace-initial tokens' logits so that words stay short, ``eog_bias`` to the end
    token's so that texts do not end too soon."""

    def __init__(self, name: str, seed: int, words: Sequence[bytes], *, alphabet: bytes = b"abcde \n",
                 boundary_bias: float = 0.0, eog_bias: float = -3.0, scale: float = 1.5,
                 n_ctx: int = 512) -> None:
        # byte fallback (never sampled) so any text tokenizes, as real vocabularies do
        fallback = [bytes([b]) for b in range(256) if b not in alphabet]
        pieces = [bytes([b]) for b in alphabet] + list(words) + fallback + [b""]
        super().__init__(name, seed, n_vocab=len(pieces), n_ctx=n_ctx, pieces=pieces, eog=len(pieces) - 1,
                         scale=scale)
        ws = np.array([p[:1] in (b" ", b"\n", b"\t", b"\r") for p in pieces])
        ws[-1] = True
        self._word_start = ws
        self._table[:, ws] += boundary_bias
        self._table[:, -1] += eog_bias - boundary_bias
        self._table[:, len(alphabet) + len(words):-1] = -60.0
        self._by_len = sorted(range(len(pieces) - 1), key=lambda t: -len(pieces[t]))
        self.tokenized: list[str] = []

    @property
    def word_start(self) -> np.ndarray:
        return self._word_start

    def tokenize_text(self, text: str) -> list[int]:
        self.tokenized.append(text)
        data = text.encode()
        out, i = [], 0
        while i < len(data):
            tok = next(t for t in self._by_len if data.startswith(self.pieces[t], i))
            out.append(tok)
            i += len(self.pieces[tok])
        return out

    def make_word_start_sampler(self, params: SamplingParams, seed: int) -> NumpySampler:
        return NumpySampler(self.logits, params, seed, allowed=self._word_start)


class FakeEmbedder:
    """An embedding context (backends.types.Embedder) over EngineMember's tokenization (each byte a
    token): an input's vector is the mean of a fixed random vector per token id, from the member's
    name, so members differ and the same text always gets the same vector."""

    pooling = "mean"
    adds_eos = False

    def __init__(self, name: str, n_ctx: int, n_vocab: int = 12, n_embd: int = 8,
                 gate: threading.Event | None = None) -> None:
        self.name = name
        self.gate = gate
        self.embedding = threading.Event()
        """Set once an embed call began (and waits for ``gate``, if any)."""
        self.n_ctx = n_ctx
        self.n_vocab = n_vocab
        self.n_embd = n_embd
        seed = sum(name.encode())
        self._table = np.random.default_rng(seed).normal(size=(n_vocab, n_embd))
        self.calls: list[list[list[int]]] = []
        self.closed = False
        self.memory_bytes = 1024 * n_ctx

    def tokenize(self, text: str) -> list[int]:
        return [b % self.n_vocab for b in text.encode()]

    def embed(self, inputs: Sequence[Sequence[int]], cancel: Callable[[], bool] | None = None) -> np.ndarray:
        self.calls.append([list(t) for t in inputs])
        self.embedding.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the embedding gate"
        assert not self.closed, "an embedding context was closed while it embedded"
        if cancel is not None and cancel():
            raise Cancelled
        return np.stack([self._table[list(t)].mean(axis=0) for t in inputs])

    def close(self) -> None:
        self.closed = True
