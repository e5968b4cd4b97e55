"""GBNF text: literals, character classes, and the JSON rules every grammar of me-local shares.

GBNF is llama.cpp's grammar format (``root ::= ...``; rule names are ``[a-zA-Z0-9-]+``). The
grammar matches code points (UTF-8 decoded), so a character class is a set of code points.

The JSON rules here are the fixed building blocks of :func:`me_local.grammar.schema_grammar`
and :data:`JSON_OBJECT_GBNF`. Their names all start with ``json-`` and their text is the same
in every grammar me-local writes, so two grammars' texts can be concatenated (llama.cpp takes
the last of two identical definitions). They differ from llama.cpp's old converter in two ways
that matter: a string never holds a raw control character (``json.loads`` and ``JSON.parse``
refuse those), and whitespace is bounded, so a small model cannot run away in it.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)

Ranges = list[tuple[int, int]]
"""A set of code points as sorted, disjoint, inclusive ranges."""


def gbnf_literal(text: str) -> str:
    """A GBNF string literal that matches ``text`` exactly (``""`` for the empty string)."""
    out = ['"']
    for ch in text:
        out.append(_literal_char(ch))
    out.append('"')
    return "".join(out)


def _literal_char(ch: str) -> str:
    if ch == '"':
        return '\\"'
    if ch == "\\":
        return "\\\\"
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    cp = ord(ch)
    if cp < 0x20 or cp == 0x7F:
        return f"\\x{cp:02X}"
    return ch


def _class_char(cp: int) -> str:
    """One code point inside ``[...]``: letters and digits as they are, everything else escaped
    (``^``, ``-``, ``]`` and ``\\`` would mean something there)."""
    if 0x30 <= cp <= 0x39 or 0x41 <= cp <= 0x5A or 0x61 <= cp <= 0x7A:
        return chr(cp)
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


def char_class(ranges: Ranges, negated: bool = False) -> str:
    """``[...]`` (``[^...]``) of the code point ranges."""
    parts = []
    for lo, hi in ranges:
        parts.append(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + ("^" if negated else "") + "".join(parts) + "]"


def normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sorted, merged, without surrogates (no UTF-8 text holds one)."""
    out: Ranges = []
    for lo, hi in sorted(ranges):
        for a, b in _cut_surrogates(lo, hi):
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return out


def _cut_surrogates(lo: int, hi: int) -> list[tuple[int, int]]:
    s_lo, s_hi = SURROGATES
    if hi < s_lo or lo > s_hi:
        return [(lo, hi)]
    parts = []
    if lo < s_lo:
        parts.append((lo, s_lo - 1))
    if hi > s_hi:
        parts.append((s_hi + 1, hi))
    return parts


def complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    nxt = 0
    for lo, hi in normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return normalize(out)


def intersect(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    i = j = 0
    a, b = normalize(a), normalize(b)
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def contains(ranges: Ranges, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


# --------------------------------------------------------------------------- JSON text

JSON_SHORT_ESCAPES = {0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}
"""The control characters JSON writes as a two-character escape."""

RAW_IN_STRING: Ranges = complement([(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)])
"""The code points a JSON string may hold as they are (me-local also escapes DEL)."""


def json_string_chars(ranges: Ranges) -> str:
    """A GBNF expression for one character of a JSON string's text whose decoded value is in
    ``ranges``: the raw character, or its escape (``\\"``, ``\\\\``, ``\\n``...). Other control
    characters (which only a ``\\u00XX`` escape could write) are left out."""
    ranges = normalize(ranges)
    alts = []
    raw = intersect(ranges, RAW_IN_STRING)
    if raw:
        alts.append(char_class(raw))
    if contains(ranges, 0x22):
        alts.append(gbnf_literal('\\"'))
    if contains(ranges, 0x5C):
        alts.append(gbnf_literal("\\\\"))
    for cp, letter in sorted(JSON_SHORT_ESCAPES.items()):
        if contains(ranges, cp):
            alts.append(gbnf_literal("\\" + letter))
    if not alts:
        return ""
    return alts[0] if len(alts) == 1 else "( " + " | ".join(alts) + " )"


WS_MAX_INDENT = 20
"""Whitespace between JSON tokens: nothing, a space, or a newline and up to this many spaces or tabs."""

INT_DIGITS = 16
"""The most digits of an integer (or of a number's integer part) where the schema sets no bound."""
FRACTION_DIGITS = 16
EXPONENT_DIGITS = 2
"""At most 2 exponent digits, so no number overflows a double (``1e999`` is infinity to most parsers)."""

JSON_RULES: dict[str, str] = {
    "json-ws": f'| " " | "\\n" [ \\t]{{0,{WS_MAX_INDENT}}}',
    # any character but '"', '\\', control characters and DEL; or an escape (\u escapes of surrogates
    # left out: they would pair up into nothing valid on their own)
    "json-char": '[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ( ["\\\\/bfnrt] | "u" json-hex4 )',
    "json-hex4": "[0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}",
    "json-string": '"\\"" json-char* "\\""',
    "json-int": f'"-"? ( "0" | [1-9] [0-9]{{0,{INT_DIGITS - 1}}} )',
    "json-number": f'json-int ( "." [0-9]{{1,{FRACTION_DIGITS}}} )? ( [eE] [-+]? [0-9]{{1,{EXPONENT_DIGITS}}} )?',
    "json-boolean": '"true" | "false"',
    "json-null": '"null"',
    "json-value": "json-object | json-array | json-string | json-number | json-boolean | json-null",
    "json-member": 'json-string json-ws ":" json-ws json-value json-ws',
    "json-object": '"{" json-ws ( json-member ( "," json-ws json-member )* )? "}"',
    "json-array": '"[" json-ws ( json-value json-ws ( "," json-ws json-value json-ws )* )? "]"',
}
"""The shared JSON rules (name: definition)."""

_JSON_DEPS: dict[str, tuple[str, ...]] = {
    "json-char": ("json-hex4",),
    "json-string": ("json-char",),
    "json-number": ("json-int",),
    "json-value": ("json-object", "json-array", "json-string", "json-number", "json-boolean", "json-null"),
    "json-member": ("json-string", "json-ws", "json-value"),
    "json-object": ("json-ws", "json-member"),
    "json-array": ("json-ws", "json-value"),
}


def json_rules(names: Iterable[str]) -> dict[str, str]:
    """The shared JSON rules that ``names`` need (with the rules they use), in a fixed order."""
    want: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in want:
            continue
        want.add(name)
        todo.extend(_JSON_DEPS.get(name, ()))
    return {name: body for name, body in JSON_RULES.items() if name in want}


def render(rules: dict[str, str]) -> str:
    """GBNF text, one rule a line, in the order given."""
    return "".join(f"{name} ::= {body}\n" for name, body in rules.items())


JSON_OBJECT_GBNF = render({"root": "json-object", **json_rules(["json-object"])})
"""Any JSON object (OpenAI's ``json_object``, Ollama's ``format: "json"``), with bounded whitespace
and no raw control characters in strings. Whitespace is allowed inside the object, not before or
after it: the answer starts with ``{`` and ends at its ``}``."""


# --------------------------------------------------------------------------- syntax errors

MAX_REPETITIONS = 2000
"""llama.cpp's limit on a ``{m,n}`` count (MAX_REPETITION_THRESHOLD)."""


class _GbnfSyntax(Exception):
    def __init__(self, message: str, pos: int | None = None, text: str = "") -> None:
        if pos is not None:
            if pos >= len(text):
                message += " at the end of the grammar"
            else:
                rest = text[pos:].split("\n", 1)[0][:20]
                message += f" at character {pos + 1} ({rest!r})" if rest else f" at character {pos + 1}"
        super().__init__(message)


def gbnf_syntax_error(text: str) -> str | None:
    """Why llama.cpp's GBNF parser refuses ``text`` (None: it would read it), found by the same
    walk as its parser (llama-grammar.cpp). llama.cpp prints that reason on stderr only and
    logs "failed to parse grammar": this gives the user the reason and where the text goes
    wrong (positions count characters from 1)."""
    try:
        _GbnfChecker(text).parse()
    except _GbnfSyntax as exc:
        return str(exc)
    return None


def _word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


class _GbnfChecker:
    def __init__(self, text: str) -> None:
        self.s = text
        self.defined: set[str] = set()
        self.used: list[str] = []

    def at(self, i: int) -> str:
        return self.s[i] if i < len(self.s) else ""

    def fail(self, message: str, pos: int | None = None) -> _GbnfSyntax:
        return _GbnfSyntax(message, pos, self.s)

    def parse(self) -> None:
        pos = self.space(0, True)
        while pos < len(self.s):
            pos = self.rule(pos)
        for name in self.used:
            if name not in self.defined:
                raise self.fail(f"undefined rule {name!r} (a rule is referred to but never defined)")

    def space(self, pos: int, newline_ok: bool) -> int:
        while True:
            c = self.at(pos)
            if c == "#":
                while self.at(pos) not in ("", "\r", "\n"):
                    pos += 1
            elif c in (" ", "\t") or (newline_ok and c in ("\r", "\n")):
                pos += 1
            else:
                return pos

    def name(self, pos: int) -> int:
        end = pos
        while end < len(self.s) and _word(self.s[end]):
            end += 1
        if end == pos:
            raise self.fail("expecting a rule name", pos)
        return end

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        self.defined.add(self.s[pos:end])
        pos = self.space(end, False)
        if self.s[pos:pos + 3] != "::=":
            raise self.fail("expecting '::='", pos)
        pos = self.alternates(self.space(pos + 3, True), False)
        c = self.at(pos)
        if c == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c:
            raise self.fail("expecting a newline or the end", pos)
        return self.space(pos, True)

    def alternates(self, pos: int, nested: bool) -> int:
        pos = self.sequence(pos, nested)
        while self.at(pos) == "|":
            pos = self.sequence(self.space(pos + 1, True), nested)
        return pos

    def char(self, pos: int) -> int:
        """One character of a literal or class (an escape included): the position after it."""
        c = self.at(pos)
        if c == "\\":
            e = self.at(pos + 1)
            size = {"x": 2, "u": 4, "U": 8}.get(e)
            if size is not None:
                digits = self.s[pos + 2:pos + 2 + size]
                n = 0
                while n < len(digits) and digits[n] in "0123456789abcdefABCDEF":
                    n += 1
                if n < size:
                    raise self.fail(f"expecting {size} hex digits after '\\{e}'", pos)
                return pos + 2 + size
            if e in ("t", "r", "n", "\\", '"', "[", "]"):
                return pos + 2
            raise self.fail(f"unknown escape '\\{e}'", pos)
        return pos + 1

    def sequence(self, pos: int, nested: bool) -> int:
        has_item = False
        while pos < len(self.s):
            c = self.s[pos]
            start = pos
            if c == '"':
                pos += 1
                while self.at(pos) != '"':
                    if not self.at(pos):
                        raise self.fail("unterminated string literal starting", start)
                    pos = self.char(pos)
                pos = self.space(pos + 1, nested)
            elif c == "[":
                pos += 1
                if self.at(pos) == "^":
                    pos += 1
                while self.at(pos) != "]":
                    if not self.at(pos):
                        raise self.fail("unterminated character class starting", start)
                    pos = self.char(pos)
                    if self.at(pos) == "-" and self.at(pos + 1) != "]":
                        if not self.at(pos + 1):
                            raise self.fail("unterminated character class starting", start)
                        pos = self.char(pos + 1)
                pos = self.space(pos + 1, nested)
            elif _word(c):
                end = self.name(pos)
                self.used.append(self.s[pos:end])
                pos = self.space(end, nested)
            elif c == "(":
                pos = self.alternates(self.space(pos + 1, True), True)
                if self.at(pos) != ")":
                    raise self.fail("expecting ')'", pos)
                pos = self.space(pos + 1, nested)
            elif c == ".":
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                if not has_item:
                    raise self.fail(f"nothing before {c!r} to repeat", pos)
                pos = self.space(pos + 1, nested)
                continue
            elif c == "{":
                if not has_item:
                    raise self.fail("nothing before '{' to repeat", pos)
                pos = self.repetition(pos, nested)
                continue
            elif c == "<" or (c == "!" and self.at(pos + 1) == "<"):  # a token (<[id]>, <piece>) or not it
                close = self.s.find(">", pos)
                if close < 0:
                    raise self.fail("unterminated token reference starting", start)
                pos = self.space(close + 1, nested)
            else:
                break
            has_item = True
        return pos

    def repetition(self, pos: int, nested: bool) -> int:
        start = pos
        pos = self.space(pos + 1, nested)
        lo_end = pos
        while self.at(lo_end).isdigit() and self.at(lo_end).isascii():
            lo_end += 1
        if lo_end == pos:
            raise self.fail("expecting a number in '{m,n}'", pos)
        counts = [int(self.s[pos:lo_end])]
        pos = self.space(lo_end, nested)
        if self.at(pos) == ",":
            pos = self.space(pos + 1, nested)
            hi_end = pos
            while self.at(hi_end).isdigit() and self.at(hi_end).isascii():
                hi_end += 1
            if hi_end > pos:
                counts.append(int(self.s[pos:hi_end]))
                pos = self.space(hi_end, nested)
            if self.at(pos) != "}":
                raise self.fail("expecting '}'", pos)
        elif self.at(pos) != "}":
            raise self.fail("expecting ',' or '}'", pos)
        if max(counts) > MAX_REPETITIONS:
            raise self.fail(f"more than {MAX_REPETITIONS} repetitions", start)
        return self.space(pos + 1, nested)
