"""Test tools for GBNF grammars: a pure-Python reader of GBNF that draws random texts from a
grammar (to check that every text a schema's grammar allows is valid against the schema), and a
checker that runs a text through llama.cpp's own grammar engine (to check that llama.cpp reads the
grammar and agrees on what it allows)."""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------- reading GBNF


@dataclass
class Lit:
    text: str


@dataclass
class Cls:
    ranges: list[tuple[int, int]]
    negated: bool

    def has(self, cp: int) -> bool:
        inside = any(lo <= cp <= hi for lo, hi in self.ranges)
        return inside != self.negated


@dataclass
class Ref:
    name: str


@dataclass
class Rep:
    item: object
    lo: int
    hi: int | None


@dataclass
class Alts:
    options: list[list[object]]


def _char(s: str, i: int) -> tuple[str, int]:
    if s[i] != "\\":
        return s[i], i + 1
    c = s[i + 1]
    if c in "xuU":
        n = {"x": 2, "u": 4, "U": 8}[c]
        return chr(int(s[i + 2:i + 2 + n], 16)), i + 2 + n
    return {"t": "\t", "r": "\r", "n": "\n"}.get(c, c), i + 2


class Gbnf:
    """A grammar read from GBNF text (the syntax me-local writes, which is llama.cpp's)."""

    def __init__(self, text: str) -> None:
        self.rules: dict[str, Alts] = {}
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, body = line.partition("::=")
            assert sep, line
            self.s, self.i = body, 0
            alts = self._alts()
            assert self.i == len(self.s), (line, self.s[self.i:])
            self.rules[name.strip()] = alts
        for alts in self.rules.values():
            self._check_refs(alts)
        self._depth = self._min_depths()
        self._needs: dict[int, list[int]] = {}

    def _check_refs(self, node: object) -> None:
        if isinstance(node, Ref):
            assert node.name in self.rules, f"undefined rule {node.name}"
        elif isinstance(node, Rep):
            self._check_refs(node.item)
        elif isinstance(node, Alts):
            for seq in node.options:
                for item in seq:
                    self._check_refs(item)

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1

    def _alts(self) -> Alts:
        options = [self._seq()]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            options.append(self._seq())
        return Alts(options)

    def _seq(self) -> list[object]:
        items: list[object] = []
        while True:
            self._ws()
            if self.i >= len(self.s) or self.s[self.i] in "|)":
                return items
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                text = []
                while self.s[self.i] != '"':
                    ch, self.i = _char(self.s, self.i)
                    text.append(ch)
                self.i += 1
                item: object = Lit("".join(text))
            elif c == "[":
                self.i += 1
                neg = self.s[self.i] == "^"
                if neg:
                    self.i += 1
                ranges = []
                while self.s[self.i] != "]":
                    lo, self.i = _char(self.s, self.i)
                    hi = lo
                    if self.s[self.i] == "-" and self.s[self.i + 1] != "]":
                        hi, self.i = _char(self.s, self.i + 1)
                    ranges.append((ord(lo), ord(hi)))
                self.i += 1
                item = Cls(ranges, neg)
            elif c == "(":
                self.i += 1
                item = self._alts()
                assert self.s[self.i] == ")"
                self.i += 1
            elif c == ".":
                self.i += 1
                item = Cls([], True)
            else:
                j = self.i
                while j < len(self.s) and (self.s[j].isalnum() or self.s[j] == "-"):
                    j += 1
                assert j > self.i, self.s[self.i:]
                item = Ref(self.s[self.i:j])
                self.i = j
            items.append(self._postfix(item))

    def _postfix(self, item: object) -> object:
        while self.i < len(self.s) and self.s[self.i] in "*+?{":
            c = self.s[self.i]
            if c == "{":
                j = self.s.index("}", self.i)
                lo_s, comma, hi_s = self.s[self.i + 1:j].partition(",")
                lo = int(lo_s)
                hi = lo if not comma else (int(hi_s) if hi_s else None)
                self.i = j + 1
            else:
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.i += 1
            item = Rep(item, lo, hi)
        return item

    # -- recognising texts -------------------------------------------------------------
    def matches(self, text: str, rule: str = "root") -> bool:
        """Whether rule ``rule`` matches the whole of ``text``."""
        self._memo: dict[tuple[str, int], frozenset[int]] = {}
        return len(text) in self._ends(Ref(rule), text, 0)

    def _ends(self, node: object, text: str, i: int) -> frozenset[int]:
        if isinstance(node, Lit):
            return frozenset([i + len(node.text)]) if text.startswith(node.text, i) else frozenset()
        if isinstance(node, Cls):
            return frozenset([i + 1]) if i < len(text) and node.has(ord(text[i])) else frozenset()
        if isinstance(node, Ref):
            key = (node.name, i)
            if key not in self._memo:
                self._memo[key] = frozenset()  # no left recursion in these grammars
                self._memo[key] = self._ends(self.rules[node.name], text, i)
            return self._memo[key]
        if isinstance(node, Alts):
            out: set[int] = set()
            for seq in node.options:
                pos = {i}
                for item in seq:
                    pos = {e for p in pos for e in self._ends(item, text, p)}
                    if not pos:
                        break
                out |= pos
            return frozenset(out)
        assert isinstance(node, Rep)
        reached = {i} if node.lo == 0 else set()
        frontier = {i}
        n = 0
        while frontier and (node.hi is None or n < node.hi):
            n += 1
            nxt = {e for p in frontier for e in self._ends(node.item, text, p)}
            if node.hi is None:
                nxt -= reached | frontier if n > node.lo else set()
            if n >= node.lo:
                reached |= nxt
            frontier = nxt
        return frozenset(reached)

    # -- drawing texts ---------------------------------------------------------------
    def _min_depths(self) -> dict[str, int]:
        """The fewest nested rule expansions each rule needs to finish."""
        inf = 10**9
        depth = dict.fromkeys(self.rules, inf)

        def need(node: object) -> int:
            if isinstance(node, Ref):
                return depth[node.name]
            if isinstance(node, Rep):
                return need(node.item) if node.lo else 0
            if isinstance(node, Alts):
                return min(max((need(i) for i in seq), default=0) for seq in node.options)
            return 0

        changed = True
        while changed:
            changed = False
            for name, alts in self.rules.items():
                d = need(alts) + 1
                if d < depth[name]:
                    depth[name], changed = d, True
        self._need = need
        return depth

    def sample(self, rng: random.Random, rule: str = "root", budget: int = 12) -> str:
        out: list[str] = []
        self._gen(Ref(rule), rng, budget, out)
        return "".join(out)

    def _gen(self, node: object, rng: random.Random, budget: int, out: list[str]) -> None:
        if isinstance(node, Lit):
            out.append(node.text)
        elif isinstance(node, Cls):
            out.append(_draw_char(node, rng))
        elif isinstance(node, Ref):
            self._gen(self.rules[node.name], rng, budget - 1, out)
        elif isinstance(node, Rep):
            hi = node.hi if node.hi is not None else node.lo + 6
            if budget <= 2 or rng.random() < 0.3:
                n = node.lo
            elif rng.random() < 0.15:
                n = hi  # the upper bound itself
            else:
                n = rng.randint(node.lo, min(hi, node.lo + 8))
            for _ in range(n):
                self._gen(node.item, rng, budget, out)
        elif isinstance(node, Alts):
            needs = self._needs.get(id(node))
            if needs is None:
                needs = self._needs[id(node)] = [max((self._need(i) for i in q), default=0) for q in node.options]
            ok = [seq for seq, need in zip(node.options, needs) if need < budget]
            seq = rng.choice(ok or [node.options[needs.index(min(needs))]])
            for item in seq:
                self._gen(item, rng, budget, out)


POOL = [chr(c) for c in range(0x20, 0x7F)] + list("\t\n\r\x00\x01\x1f\x7féñ中文😀\u2028\u00a0")


_POOL_CACHE: dict[tuple[tuple[tuple[int, int], ...], bool], list[str]] = {}


def _draw_char(cls: Cls, rng: random.Random) -> str:
    if rng.random() < 0.85:
        key = (tuple(cls.ranges), cls.negated)
        options = _POOL_CACHE.get(key)
        if options is None:
            options = _POOL_CACHE[key] = [c for c in POOL if cls.has(ord(c))]
        if options:
            return rng.choice(options)
    if not cls.negated:
        lo, hi = rng.choice(cls.ranges)
        while True:
            cp = rng.randint(lo, min(hi, 0x3FFFF))  # SmolLM2 has no tokens for the lead bytes past U+3FFFF
            if not 0xD800 <= cp <= 0xDFFF:
                return chr(cp)
    while True:
        cp = rng.randint(0x20, 0x2FFFF)
        if cls.has(cp) and not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


# --------------------------------------------------------------------------- llama.cpp's grammar engine


class LlamaGrammarCheck:
    """llama.cpp's grammar sampler over a model's vocabulary (loaded vocabulary only): whether it
    reads a grammar, and whether it takes a text (token by token, each checked before it is
    accepted, so a rejected token is an answer rather than an abort)."""

    def __init__(self, model_path: Path) -> None:
        from llama_cpp import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        self.model = L.llama_model_load_from_file(str(model_path).encode(), params)
        assert self.model
        self.vocab = L.llama_model_get_vocab(self.model)
        self.eog = [t for t in range(L.llama_vocab_n_tokens(self.vocab)) if L.llama_vocab_is_eog(self.vocab, t)]

    def close(self) -> None:
        self.L.llama_model_free(self.model)

    def load(self, gbnf: str) -> ctypes.c_void_p | None:
        smpl = self.L.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        return smpl or None

    def parses(self, gbnf: str) -> bool:
        smpl = self.load(gbnf)
        if smpl is None:
            return False
        self.L.llama_sampler_free(smpl)
        return True

    def _allowed(self, smpl: ctypes.c_void_p, token: int) -> bool:
        L = self.L
        data = (L.llama_token_data * 1)()
        data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
        arr = L.llama_token_data_array(data, 1, -1, False)
        L.llama_sampler_apply(smpl, ctypes.byref(arr))
        return data[0].logit != float("-inf")

    def tokens(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.L.llama_token * (len(raw) + 8))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def run(self, gbnf: str, text: str) -> str:
        """"complete" (the grammar took the whole text and may end there), "incomplete" (it took
        the text but wants more) or "rejected"."""
        smpl = self.load(gbnf)
        assert smpl is not None, "llama.cpp could not read the grammar"
        try:
            for t in self.tokens(text):
                if not self._allowed(smpl, t):
                    return "rejected"
                self.L.llama_sampler_accept(smpl, t)
            return "complete" if any(self._allowed(smpl, t) for t in self.eog) else "incomplete"
        finally:
            self.L.llama_sampler_free(smpl)
