"""A JSON Schema ``pattern`` (an ECMA-262 regular expression) as GBNF for the text of a JSON string.

The grammar writes the string's JSON text, so each character the pattern allows is written as
JSON writes it: raw, or escaped (``\\"``, ``\\\\``, ``\\n``...). What the pattern language has
beyond a regular language, or what a grammar cannot say, is refused with the reason:
back-references, lookaround, word boundaries, Unicode property classes, inline flags.

Supported: literals; ``.``; classes ``[...]``/``[^...]`` with ranges; ``\\d \\D \\w \\W \\s \\S``;
escapes ``\\t \\n \\r \\f \\v \\0 \\xHH \\uHHHH`` and escaped punctuation; groups ``(...)``,
``(?:...)``, ``(?<name>...)``; alternation; quantifiers ``* + ? {m} {m,} {m,n}`` (a lazy ``?``
after one changes nothing about which strings match); ``^`` and ``$`` at the start and end of
the pattern or of one of its top-level alternatives. A pattern is not anchored unless it says
so (JSON Schema's rule): ``abc`` matches any string that contains ``abc``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .gbnf import Ranges, complement, json_string_chars, normalize

MAX_REPEAT = 1000
"""The largest count a quantifier may name (llama.cpp refuses rules repeated 2,000 times or more)."""


class PatternError(ValueError):
    """The pattern cannot be turned into a grammar: the message says why (no path)."""


# --------------------------------------------------------------------------- the syntax tree


@dataclass
class Chars:
    ranges: Ranges


@dataclass
class Seq:
    items: list[Node]


@dataclass
class Alt:
    options: list[Node]


@dataclass
class Repeat:
    node: Node
    lo: int
    hi: int | None


Node = Chars | Seq | Alt | Repeat

DIGIT: Ranges = [(0x30, 0x39)]
WORD: Ranges = normalize([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
SPACE: Ranges = normalize([(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                           (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
                           (0xFEFF, 0xFEFF)])
LINE_TERMINATORS: Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]
ANY_BUT_NEWLINE = complement(LINE_TERMINATORS)
CLASS_ESCAPES = {"d": DIGIT, "D": complement(DIGIT), "w": WORD, "W": complement(WORD), "s": SPACE,
                 "S": complement(SPACE)}
CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.s = pattern
        self.i = 0

    def error(self, what: str) -> PatternError:
        return PatternError(f"{what} (at character {self.i + 1} of the pattern)")

    def peek(self, k: int = 0, n: int = 1) -> str:
        """``n`` characters from ``k`` on ("" past the end)."""
        return self.s[self.i + k:self.i + k + n]

    def top(self) -> list[tuple[bool, Node, bool]]:
        """The top-level alternatives, each as (anchored at the start, node, anchored at the end)."""
        branches = []
        while True:
            start = self.peek() == "^"
            if start:
                self.i += 1
            node = self.sequence(top=True)
            end = False
            if self.peek() == "$":
                self.i += 1
                end = True
            branches.append((start, node, end))
            if self.peek() == "|":
                self.i += 1
                continue
            if self.i < len(self.s):
                if self.peek() == ")":
                    raise self.error("unbalanced ')'")
                raise self.error(f"'{self.peek()}' is not supported here")
            return branches

    def alternation(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(options)

    def sequence(self, top: bool = False) -> Node:
        items: list[Node] = []
        while self.i < len(self.s):
            c = self.peek()
            if c in "|)":
                break
            if c == "$" and top and self._ends_branch():
                break
            if c in "^$":
                raise self.error(f"'{c}' is only supported at the start ('^') or end ('$') of the pattern")
            atom = self.atom()
            items.append(self.quantified(atom))
        return items[0] if len(items) == 1 else Seq(items)

    def _ends_branch(self) -> bool:
        return self.i + 1 == len(self.s) or self.s[self.i + 1] == "|"

    def atom(self) -> Node:
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.peek() == "?":
                if self.peek(1) == ":":
                    self.i += 2
                elif (self.peek(1) == "<" and self.peek(2) not in "=!") or self.peek(1, 2) == "P<":
                    close = self.s.find(">", self.i)
                    if close < 0:
                        raise self.error("unterminated group name")
                    self.i = close + 1
                elif self.peek(1) in "=!" or (self.peek(1) == "<" and self.peek(2) in "=!"):
                    raise self.error("lookahead and lookbehind are not supported")
                else:
                    raise self.error("inline flags and other '(?' groups are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return node
        if c == "[":
            return Chars(self.char_class())
        if c == ".":
            self.i += 1
            return Chars(ANY_BUT_NEWLINE)
        if c == "\\":
            return Chars(self.escape(in_class=False))
        if c in "*+?{":
            if c == "{" and not self._is_quantifier():
                self.i += 1
                return Chars([(ord(c), ord(c))])
            raise self.error(f"nothing to repeat before '{c}'")
        if c == "]" or c == "}":
            self.i += 1
            return Chars([(ord(c), ord(c))])
        self.i += 1
        return Chars([(ord(c), ord(c))])

    def _is_quantifier(self) -> bool:
        j = self.i + 1
        digits = 0
        while j < len(self.s) and self.s[j].isdigit():
            j += 1
            digits += 1
        if digits == 0:
            return False
        if j < len(self.s) and self.s[j] == "}":
            return True
        if j < len(self.s) and self.s[j] == ",":
            j += 1
            while j < len(self.s) and self.s[j].isdigit():
                j += 1
            return j < len(self.s) and self.s[j] == "}"
        return False

    def quantified(self, node: Node) -> Node:
        while True:
            c = self.peek()
            if c == "*":
                lo, hi = 0, None
                self.i += 1
            elif c == "+":
                lo, hi = 1, None
                self.i += 1
            elif c == "?":
                lo, hi = 0, 1
                self.i += 1
            elif c == "{" and self._is_quantifier():
                lo, hi = self.braces()
            else:
                return node
            if self.peek() == "?":  # lazy: the same strings match
                self.i += 1
            if self.peek() == "+":
                raise self.error("possessive quantifiers are not supported")
            node = Repeat(node, lo, hi)

    def braces(self) -> tuple[int, int | None]:
        close = self.s.index("}", self.i)
        body = self.s[self.i + 1:close]
        lo_s, comma, hi_s = body.partition(",")
        lo = int(lo_s)
        hi: int | None = lo if not comma else (int(hi_s) if hi_s else None)
        if hi is not None and hi < lo:
            raise self.error(f"'{{{body}}}' has its numbers out of order")
        if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
            raise self.error(f"'{{{body}}}' repeats more than {MAX_REPEAT} times")
        self.i = close + 1
        return lo, hi

    def escape(self, in_class: bool) -> Ranges:
        self.i += 1  # the backslash
        c = self.peek()
        if not c:
            raise self.error("the pattern ends with a lone '\\'")
        self.i += 1
        if c in CLASS_ESCAPES:
            return CLASS_ESCAPES[c]
        if c in CHAR_ESCAPES and not (c == "0" and self.peek().isdigit()):
            cp = CHAR_ESCAPES[c]
            return [(cp, cp)]
        if c == "b" and in_class:
            return [(0x08, 0x08)]
        if c in "bB":
            raise self.error(f"'\\{c}' (a word boundary) is not supported")
        if c == "x":
            return self._hex(2)
        if c == "u":
            if self.peek() == "{":
                raise self.error("'\\u{...}' escapes are not supported; write '\\uHHHH'")
            return self._hex(4)
        if c.isdigit() or c == "k":
            raise self.error("back-references are not supported")
        if c in "pP":
            raise self.error(f"'\\{c}{{...}}' (Unicode property classes) are not supported")
        if c == "c":
            raise self.error("'\\c' control escapes are not supported")
        if c.isalnum():
            raise self.error(f"'\\{c}' is not a known escape")
        return [(ord(c), ord(c))]

    def _hex(self, n: int) -> Ranges:
        digits = self.s[self.i:self.i + n]
        if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise self.error(f"expected {n} hex digits")
        self.i += n
        cp = int(digits, 16)
        return [(cp, cp)]

    def char_class(self) -> Ranges:
        self.i += 1  # '['
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: Ranges = []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.error("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            if c == "]":  # '[]' matches nothing in ECMA-262; '[]a]' is not what the author meant
                raise self.error("an empty class '[]' matches nothing")
            first = False
            lo_set = self._class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi_set = self._class_atom()
                if len(lo_set) != 1 or lo_set[0][0] != lo_set[0][1] or len(hi_set) != 1 or \
                        hi_set[0][0] != hi_set[0][1]:
                    raise self.error("a range in a class must be between two characters")
                lo, hi = lo_set[0][0], hi_set[0][0]
                if hi < lo:
                    raise self.error("a range in a class is out of order")
                ranges.append((lo, hi))
            else:
                ranges.extend(lo_set)
        ranges = normalize(ranges)
        return complement(ranges) if negated else ranges

    def _class_atom(self) -> Ranges:
        c = self.peek()
        if c == "\\":
            return self.escape(in_class=True)
        if c == "[" and self.peek(1) in ":=.":
            raise self.error("POSIX classes like '[:alpha:]' are not supported")
        self.i += 1
        return [(ord(c), ord(c))]


def parse(pattern: str) -> list[tuple[bool, Node, bool]]:
    """The pattern's top-level alternatives: (anchored at the start, node, anchored at the end)."""
    try:
        return _Parser(pattern).top()
    except (IndexError, ValueError) as exc:
        if isinstance(exc, PatternError):
            raise
        raise PatternError(f"cannot read the pattern ({exc})") from None


# --------------------------------------------------------------------------- to GBNF


def pattern_gbnf(pattern: str, new_rule: Callable[[str, str], str], any_char: str) -> str:
    """A GBNF expression for the text between a JSON string's quotes whose decoded value matches
    ``pattern``. ``new_rule(hint, body)`` defines an auxiliary rule and returns its name;
    ``any_char`` is the name of the rule for any one character of a JSON string."""
    branches = parse(pattern)
    alts = []
    for start, node, end in branches:
        parts = []
        if not start:
            parts.append(f"{any_char}*")
        body = _emit(node, new_rule)
        if body:
            parts.append(body)
        if not end:
            parts.append(f"{any_char}*")
        alts.append(" ".join(parts) if parts else '""')
    return alts[0] if len(alts) == 1 else "( " + " | ".join(alts) + " )"


def _emit(node: Node, new_rule: Callable[[str, str], str]) -> str:
    if isinstance(node, Chars):
        ranges = normalize(node.ranges)
        if not ranges:
            raise PatternError("a class in the pattern matches no character")
        expr = json_string_chars(ranges)
        if not expr:
            raise PatternError("a class in the pattern matches only control characters, which me-local "
                               "does not write into strings")
        return expr
    if isinstance(node, Seq):
        parts = [_emit(item, new_rule) for item in node.items]
        return " ".join(p for p in parts if p) or '""'
    if isinstance(node, Alt):
        return "( " + " | ".join(_emit(o, new_rule) or '""' for o in node.options) + " )"
    inner = _emit(node.node, new_rule)
    if isinstance(node.node, Chars) and not inner.startswith("("):
        item = inner
    else:  # a rule of its own, so llama.cpp's repetition limit counts it as one symbol
        item = new_rule("pat", inner)
    if node.hi is None:
        if node.lo == 0:
            return f"{item}*"
        if node.lo == 1:
            return f"{item}+"
        return f"{item}{{{node.lo},}}"
    if (node.lo, node.hi) == (0, 1):
        return f"{item}?"
    if node.lo == node.hi:
        return f"{item}{{{node.lo}}}" if node.lo else '""'
    return f"{item}{{{node.lo},{node.hi}}}"

