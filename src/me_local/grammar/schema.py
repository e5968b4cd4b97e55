"""JSON Schema to GBNF: the grammar of the JSON texts a schema accepts, for constrained decoding.

:func:`schema_grammar` first walks the whole schema and refuses, naming its path in the request
(``response_format.json_schema.schema.properties.age.multipleOf``) and what to do instead, every
keyword the grammar could not enforce: a schema is either honoured or refused, never half read.
Then it writes the grammar. What a schema may hold is listed in docs/server.md ("Structured
output"); in short:

* ``type`` (one or a list), ``enum``, ``const``, ``nullable`` (OpenAPI's), ``anyOf``, ``oneOf``
  (taken as ``anyOf``: branches that overlap are not told apart), ``allOf`` (merged), local
  ``$ref`` (``#/$defs/...``, ``#/definitions/...``, ``#``; recursion works);
* strings: ``minLength``, ``maxLength``, ``pattern`` (see :mod:`.regex`), ``format`` date,
  time, date-time, uuid;
* integers and numbers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``
  (a number's bounds must be whole numbers);
* objects: ``properties``, ``required``, ``additionalProperties``;
* arrays: ``items``, ``prefixItems`` (or draft 7's list ``items`` with ``additionalItems``),
  ``minItems``, ``maxItems``;
* annotations, which change nothing: ``title``, ``description``, ``default``, ``examples``...

The grammar writes a subset of the valid texts, which is all a generation needs: properties in
the schema's order; no property the schema does not name unless ``additionalProperties`` allows
them (they come last); no array items past ``prefixItems`` unless ``items`` (or ``minItems``)
asks for them; whitespace bounded; no raw control characters in strings; numbers with at most
16 digits before the point where no bound applies.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from ..errors import RequestError
from .gbnf import JSON_RULES, RAW_IN_STRING, char_class, gbnf_literal, intersect, json_rules, render
from .numbers import integer_range, number_range
from .regex import MAX_REPEAT, PatternError, pattern_gbnf

log = logging.getLogger("me_local.grammar")

Path = tuple[str | int, ...]

ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$id", "$comment", "$anchor",
    "deprecated", "readOnly", "writeOnly", "discriminator",
})
"""Keywords that describe a schema without constraining it. ``discriminator`` (OpenAPI's, which
pydantic writes beside ``oneOf``) only says which property tells the branches apart; the branches'
own ``const``/``enum`` enforce it."""

STRUCTURE = frozenset({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
                       "nullable"})
STRING = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMERIC = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
OBJECT = frozenset({"properties", "required", "additionalProperties"})
ARRAY = frozenset({"items", "prefixItems", "minItems", "maxItems", "additionalItems", "uniqueItems"})
SUPPORTED = ANNOTATIONS | STRUCTURE | STRING | NUMERIC | OBJECT | ARRAY

TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
FORMATS = ("date", "time", "date-time", "uuid")

_LIST_THEM = "list the properties in `properties` (and those that must be there in `required`)"
REFUSED: dict[str, str] = {
    "multipleOf": "a grammar cannot check divisibility; remove it, or list the values in `enum`",
    "uniqueItems": "a grammar cannot check that items differ; remove it (a list rather than a set)",
    "minProperties": f"a grammar cannot count the properties; {_LIST_THEM}",
    "maxProperties": f"a grammar cannot count the properties; {_LIST_THEM}",
    "patternProperties": f"property names by pattern are not supported; {_LIST_THEM}, or give "
                         "`additionalProperties` a schema",
    "propertyNames": f"property names by schema are not supported; {_LIST_THEM}, or give "
                     "`additionalProperties` a schema",
    "dependentRequired": "properties that depend on others are not supported; use `anyOf` with one object "
                         "schema per case",
    "dependentSchemas": "schemas that depend on properties are not supported; use `anyOf` with one object "
                        "schema per case",
    "dependencies": "properties that depend on others are not supported; use `anyOf` with one object schema "
                    "per case",
    "unevaluatedProperties": "not supported; use `additionalProperties`",
    "unevaluatedItems": "not supported; use `items`",
    "contains": "not supported; describe the items with `items` or `prefixItems`",
    "minContains": "not supported; describe the items with `items` or `prefixItems`",
    "maxContains": "not supported; describe the items with `items` or `prefixItems`",
    "not": "a grammar cannot exclude a schema; describe what is allowed (`enum`, `anyOf`)",
    "if": "conditional schemas are not supported; use `anyOf` with one schema per case",
    "then": "conditional schemas are not supported; use `anyOf` with one schema per case",
    "else": "conditional schemas are not supported; use `anyOf` with one schema per case",
    "$dynamicRef": "not supported; use `$ref` to `#/$defs/...`",
    "$dynamicAnchor": "not supported; use `$ref` to `#/$defs/...`",
    "$recursiveRef": "not supported; use `$ref` to `#/$defs/...`",
    "$recursiveAnchor": "not supported; use `$ref` to `#/$defs/...`",
    "contentEncoding": "a grammar does not check encoded content; remove it",
    "contentMediaType": "a grammar does not check encoded content; remove it",
    "contentSchema": "a grammar does not check encoded content; remove it",
}

MAX_LENGTH = MAX_REPEAT * MAX_REPEAT
"""The largest ``maxLength``/``minItems``... a schema may give (strings of a million characters)."""
MAX_GRAMMAR_CHARS = 4_000_000
MAX_DEPTH = 64
"""How deep references may nest within ``allOf``/``$ref`` merges (a loop of them is refused)."""

# The formats' grammars (for the text between the quotes). RFC 3339: full-date, full-time, date-time.
_DAY = {
    "31": '( "0" [1-9] | [12] [0-9] | "3" [01] )',
    "30": '( "0" [1-9] | [12] [0-9] | "30" )',
    "28": '( "0" [1-9] | "1" [0-9] | "2" [0-8] )',
}
FORMAT_RULES = {
    # years 0001-9999: RFC 3339 allows 0000, but Python's datetime (pydantic, jsonschema) does not
    "json-date": '( [1-9] [0-9]{3} | "0" ( [1-9] [0-9]{2} | "0" ( [1-9] [0-9] | "0" [1-9] ) ) ) "-" '
                 '( ( "0" [13578] | "1" [02] ) "-" ' + _DAY["31"]
                 + ' | ( "0" [469] | "11" ) "-" ' + _DAY["30"] + ' | "02-" ' + _DAY["28"] + " )",
    "json-time": '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
                 '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "json-date-time": 'json-date "T" json-time',
    "json-uuid": "[0-9a-fA-F]{8} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" "
                 "[0-9a-fA-F]{12}",
}
FORMAT_LENGTHS = {"date": (10, 10), "time": (9, 21), "date-time": (20, 32), "uuid": (36, 36)}
"""The shortest and longest text each format's grammar writes (for ``minLength``/``maxLength``)."""
_FORMAT_DEPS = {"json-date-time": ("json-date", "json-time")}

_NAME_CHARS = re.compile(r"[^A-Za-z0-9-]+")


def schema_grammar(schema: Any, *, param: str, rule: str = "root") -> str:
    """GBNF text in which rule ``rule`` matches JSON text valid against ``schema``.

    Auxiliary rules are named ``{rule}-...``, and the shared JSON rules ``json-...`` (the same text
    in every grammar this module writes), so grammars made for different ``rule`` names can be
    concatenated. A schema with a keyword the grammar cannot enforce, or that is malformed, raises
    :class:`RequestError` with ``param`` = ``{param}.<path>`` (the keyword's path in the request)
    and a message that says what to do instead."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", rule):
        raise ValueError(f"rule name {rule!r} is not a GBNF name")
    try:
        conv = _Converter(schema, param, rule)
        conv.check(schema, ())
        return conv.convert()
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(f"`{param}` is nested too deeply to turn into a grammar; flatten it with `$defs`",
                           param=param, code="unsupported_schema") from None
    except Exception as exc:  # a bug of the converter must still be a clear 400, never a 500
        log.exception("converting a JSON schema to a grammar failed")
        raise RequestError(f"`{param}` could not be turned into a grammar ({type(exc).__name__}: {exc}); "
                           "simplify the schema", param=param, code="unsupported_schema") from None


def _segment(seg: str | int) -> str:
    return f"[{seg}]" if isinstance(seg, int) else f".{seg}"


def json_type_name(v: Any) -> str:
    """The JSON type of a value parsed from JSON, as errors name it (``number`` for integers too)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object" if isinstance(v, dict) else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # an int is always finite (and one past a float's range would overflow math.isfinite)
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _matches_type(value: Any, t: str) -> bool:
    if t == "integer":
        return _is_int(value) or (isinstance(value, float) and value.is_integer())
    if t == "number":
        return _is_number(value)
    return json_type_name(value) == t


class _Converter:
    def __init__(self, root: Any, param: str, rule: str) -> None:
        self.root = root
        self.param = param
        self.rule = rule
        self.rules: dict[str, str] = {}
        self.names: set[str] = set(JSON_RULES) | set(FORMAT_RULES)
        self.by_body: dict[str, str] = {}
        self.shared: set[str] = set()
        self.ref_rules: dict[str, str] = {}
        self.heads: list[str] = ["#"]
        """The references whose rules are being written and have written no text yet: one of them
        referred to again would be a left-recursive rule, which matches nothing and llama.cpp refuses."""

    # -- errors --------------------------------------------------------------------
    def where(self, path: Path) -> str:
        return self.param + "".join(_segment(s) for s in path)

    def refuse(self, path: Path, message: str, code: str = "unsupported_schema") -> RequestError:
        p = self.where(path)
        return RequestError(f"`{p}` {message}", param=p, code=code)

    def invalid(self, path: Path, message: str) -> RequestError:
        return self.refuse(path, message, code="invalid_schema")

    # -- the walk before conversion ------------------------------------------------
    def check(self, s: Any, path: Path) -> None:
        """Refuse the first keyword (depth first, in the schema's order) that the grammar cannot
        enforce, and any malformed keyword value."""
        if s is True:
            return
        if s is False:
            raise self.refuse(path, "is `false`, which no value matches; remove the property or give it a schema")
        if not isinstance(s, dict):
            raise self.invalid(path, f"must be a JSON Schema (an object), got {json_type_name(s)}")
        for key, value in s.items():
            at = (*path, key)
            if key in REFUSED and not (key == "uniqueItems" and value is False):
                raise self.refuse(at, f"is not supported by constrained decoding: {REFUSED[key]}")
            if key not in SUPPORTED:
                if key.startswith("x-"):
                    continue  # a vendor extension (OpenAPI), an annotation by definition
                raise self.refuse(at, "is not a JSON Schema keyword that constrained decoding supports; remove "
                                  "it (see docs/server.md, \"Structured output\")")
            self._check_value(key, value, s, at)

    def _check_value(self, key: str, value: Any, s: dict[str, Any], at: Path) -> None:
        if key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise self.invalid(at, f"must be an object of schemas, got {json_type_name(value)}")
            for name, sub in value.items():
                self.check(sub, (*at, name))
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or (key != "prefixItems" and not value):
                raise self.invalid(at, "must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                self.check(sub, (*at, i))
        elif key == "items":
            if isinstance(value, list):
                for i, sub in enumerate(value):
                    self.check(sub, (*at, i))
            elif value is not False:
                self.check(value, at)
        elif key in ("additionalProperties", "additionalItems"):
            if value is not False:
                self.check(value, at)
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in TYPES for t in types):
                raise self.invalid(at, f"must be one of {', '.join(TYPES)} or a list of them, got {json.dumps(value)}")
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise self.invalid(at, "must be a list of property names")
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise self.invalid(at, "must be a non-empty list of values")
        elif key in ("minLength", "maxLength", "minItems", "maxItems"):
            if not _is_int(value) or value < 0:
                raise self.invalid(at, f"must be a non-negative integer, got {json.dumps(value)}")
            if value > MAX_LENGTH:
                raise self.refuse(at, f"is {value}; constrained decoding supports at most {MAX_LENGTH:,}")
        elif key in NUMERIC:
            ok = _is_number(value) or (key.startswith("exclusive") and isinstance(value, bool))
            if not ok:
                raise self.invalid(at, f"must be a number, got {json.dumps(value)}")
        elif key == "pattern":
            if not isinstance(value, str):
                raise self.invalid(at, f"must be a string, got {json_type_name(value)}")
            try:
                pattern_gbnf(value, lambda hint, body: "x", "x")
            except PatternError as exc:
                raise self.refuse(at, f"cannot be enforced by constrained decoding: {exc}; simplify the pattern "
                                  "or remove it") from None
        elif key == "format":
            t = s.get("type", "string")
            if value not in FORMATS and "string" in (t if isinstance(t, list) else [t]):
                raise self.refuse(at, f"{json.dumps(value)} is not a format constrained decoding supports "
                                  f"({', '.join(FORMATS)}); remove it, or describe the text with `pattern`")
        elif key == "$ref":
            if not isinstance(value, str):
                raise self.invalid(at, f"must be a string, got {json_type_name(value)}")
            self.resolve(value, at)
        elif key == "nullable":
            if not isinstance(value, bool):
                raise self.invalid(at, "must be true or false")
        elif key == "uniqueItems" and value is not False:
            raise self.invalid(at, "must be true or false")

    # -- references ---------------------------------------------------------------
    def resolve(self, ref: str, at: Path) -> Any:
        if not ref.startswith("#"):
            raise self.refuse(at, f"{json.dumps(ref)} points outside the schema; only references inside it "
                              "(`#/$defs/...`) are supported: put the schema under `$defs`")
        pointer = unquote(ref[1:])
        node = self.root
        if pointer:
            if not pointer.startswith("/"):
                raise self.refuse(at, f"{json.dumps(ref)} is not a JSON pointer; write `#/$defs/NAME`")
            for raw in pointer[1:].split("/"):
                part = raw.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise self.invalid(at, f"{json.dumps(ref)} points at nothing in the schema")
        return node

    def ref_rule(self, ref: str, at: Path) -> str:
        """A rule for the schema ``ref`` points at, written once however often it is used (and
        when it refers to itself)."""
        name = self.ref_rules.get(ref)
        if name is not None:
            if ref in self.heads:
                raise self.refuse(at, f"leads back to {json.dumps(ref)} before any value is written (a loop of "
                                  "references and `anyOf` branches), which no JSON text can end; let the loop go "
                                  "through a property or an array item")
            return name
        if ref == "#":
            self.ref_rules[ref] = self.rule
            return self.rule
        target = self.resolve(ref, at)
        hint = ref.rsplit("/", 1)[-1] or "ref"
        name = self.ref_rules[ref] = self.reserve(hint)
        self.heads.append(ref)
        try:
            self.rules[name] = self.visit(target, _pointer_path(ref) if ref.startswith("#/") else at, name)
        finally:
            self.heads.pop()
        return name

    # -- rules ---------------------------------------------------------------------
    def reserve(self, hint: str) -> str:
        """A new rule name ``{rule}-{hint}`` (the hint without the rule's prefix, if it has it)."""
        if hint.startswith(self.rule + "-"):
            hint = hint[len(self.rule) + 1:]
        base = f"{self.rule}-{_NAME_CHARS.sub('-', hint).strip('-') or 'x'}"
        name, i = base, 1
        while name in self.names or name in self.rules:
            i += 1
            name = f"{base}{i}"
        self.names.add(name)
        return name

    def define(self, hint: str, body: str) -> str:
        """A rule with this body (one rule for equal bodies); its name."""
        known = self.by_body.get(body)
        if known is not None:
            return known
        name = self.reserve(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def use(self, name: str) -> str:
        """A shared rule (``json-...``), written into the grammar."""
        self.shared.add(name)
        return name

    def convert(self) -> str:
        self.names.add(self.rule)
        self.ref_rules["#"] = self.rule
        body = self.visit(self.root, (), self.rule)
        rules = _reachable({self.rule: body, **{k: v for k, v in self.rules.items() if k != self.rule}}, self.rule)
        fmt = set()
        for name in sorted(self.shared):
            if name in FORMAT_RULES:
                fmt.add(name)
                fmt.update(_FORMAT_DEPS.get(name, ()))
        shared = json_rules(n for n in self.shared if n in JSON_RULES)
        shared.update({n: FORMAT_RULES[n] for n in FORMAT_RULES if n in fmt})
        text = render(rules) + render(shared)
        if len(text) > MAX_GRAMMAR_CHARS:
            raise self.refuse((), f"makes a grammar of {len(text):,} characters (at most {MAX_GRAMMAR_CHARS:,}); "
                              "use fewer or shorter `enum` values, smaller bounds, or fewer properties")
        return text

    def alternatives(self, hint: str, alts: list[str]) -> str:
        alts = list(dict.fromkeys(alts))
        return alts[0] if len(alts) == 1 else self.define(hint, " | ".join(alts))

    def repeat(self, item: str, lo: int, hi: int | None, hint: str) -> str:
        """``item`` ``lo`` to ``hi`` times (None: no limit), counts above llama.cpp's limit on one
        repetition written as blocks of :data:`MAX_REPEAT`."""
        if lo <= MAX_REPEAT and (hi is None or hi <= MAX_REPEAT):
            return _rep(item, lo, hi)
        block = self.define(f"{hint}-block", f"{item}{{{MAX_REPEAT}}}")
        q, r = divmod(lo, MAX_REPEAT)
        parts = [p for p in (_rep(block, q, q), _rep(item, r, r)) if p]
        if hi is None:
            parts.append(f"{item}*")
        elif hi > lo:
            qd, rd = divmod(hi - lo, MAX_REPEAT)
            if qd == 0:
                parts.append(_rep(item, 0, rd))
            else:
                few = " ".join(p for p in (_rep(block, 0, qd - 1), _rep(item, 0, MAX_REPEAT - 1)) if p)
                last = " ".join(p for p in (_rep(block, qd, qd), _rep(item, 0, rd)) if p)
                parts.append(self.define(f"{hint}-more", f"{few} | {last}"))
        return " ".join(parts) or '""'

    # -- conversion ----------------------------------------------------------------
    def visit(self, s: Any, path: Path, hint: str) -> str:
        """A GBNF expression (usually a rule name) for the JSON texts valid against ``s``."""
        if s is True:
            return self.use("json-value")
        assert isinstance(s, dict)
        keys = [k for k in s if k not in ANNOTATIONS and not k.startswith("x-") and k not in ("$defs", "definitions")]
        if not keys:
            return self.use("json-value")
        if "$ref" in s:
            if keys == ["$ref"]:
                return self.ref_rule(s["$ref"], (*path, "$ref"))
            return self.visit(self.flatten(s, path), path, hint)
        if "allOf" in s:
            return self.visit(self.flatten(s, path), path, hint)
        if s.get("nullable") is True:
            rest = {k: v for k, v in s.items() if k != "nullable"}
            return self.alternatives(hint, [self.visit(rest, path, hint), self.use("json-null")])
        if "anyOf" in s and "oneOf" in s:
            raise self.refuse((*path, "oneOf"), "with `anyOf` beside it is not supported; combine them into one "
                              "`anyOf`")
        for key in ("anyOf", "oneOf"):
            if key in s:
                rest = {k: v for k, v in s.items() if k != key and k not in ANNOTATIONS}
                alts = []
                for i, branch in enumerate(s[key]):
                    at = (*path, key, i)
                    merged = self.merge(self.flatten(branch, at), rest, at) if rest else branch
                    alts.append(self.visit(merged, at, f"{hint}-{i}"))
                return self.alternatives(hint, alts)
        if "const" in s or "enum" in s:
            return self.values(s, path, hint)
        types = self.types(s)
        if types is None:
            return self.use("json-value")
        alts = [self.typed(t, s, path, hint if len(types) == 1 else f"{hint}-{t}") for t in types]
        return self.alternatives(hint, alts)

    def types(self, s: dict[str, Any]) -> list[str] | None:
        """The types to write: ``type``, or those the schema's keywords are about (None: any value)."""
        t = s.get("type")
        if t is not None:
            types = list(dict.fromkeys(t if isinstance(t, list) else [t]))
            if "integer" in types and "number" in types:
                types.remove("integer")
            return types
        found = []
        for kind, kws in (("string", STRING), ("number", NUMERIC), ("object", OBJECT), ("array", ARRAY)):
            if any(k in s for k in kws):
                found.append(kind)
        return found or None

    def typed(self, t: str, s: dict[str, Any], path: Path, hint: str) -> str:
        heads, self.heads = self.heads, []  # every typed value starts with text of its own
        try:
            return self._typed(t, s, path, hint)
        finally:
            self.heads = heads

    def _typed(self, t: str, s: dict[str, Any], path: Path, hint: str) -> str:
        if t == "string":
            return self.string(s, path, hint)
        if t == "integer":
            return self.integer(s, path, hint)
        if t == "number":
            return self.number(s, path, hint)
        if t == "boolean":
            return self.use("json-boolean")
        if t == "null":
            return self.use("json-null")
        if t == "object":
            return self.object(s, path, hint)
        return self.array(s, path, hint)

    def values(self, s: dict[str, Any], path: Path, hint: str) -> str:
        other = [k for k in s if k not in ANNOTATIONS and not k.startswith("x-")
                 and k not in ("enum", "const", "type", "$defs", "definitions")]
        if other:
            raise self.refuse((*path, other[0]), "beside `enum`/`const` is not supported; list only the allowed "
                              "values")
        values = list(s["enum"]) if "enum" in s else [s["const"]]
        if "const" in s and "enum" in s:
            values = [v for v in values if _same(v, s["const"])]
        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            values = [v for v in values if any(_matches_type(v, t) for t in types)]
        if not values:
            key = "enum" if "enum" in s else "const"
            raise self.refuse((*path, key), "allows no value (none is of the schema's `type`); fix the values or "
                              "the `type`")
        literals = [gbnf_literal(json.dumps(v, ensure_ascii=False)) for v in values]
        return self.alternatives(f"{hint}-value", literals)

    # -- merging (allOf, $ref with siblings, anyOf with siblings) -----------------------
    def flatten(self, s: Any, path: Path, depth: int = 0) -> dict[str, Any]:
        """``s`` with its ``$ref`` and ``allOf`` merged into it."""
        if depth > MAX_DEPTH:
            raise self.refuse(path, "has references or `allOf` nested too deeply (a loop?); simplify the schema")
        if s is True:
            return {}
        if not isinstance(s, dict):
            raise self.refuse(path, "is `false`, which no value matches")
        out = dict(s)
        if "$ref" in out:
            ref = out.pop("$ref")
            at = _pointer_path(ref) if ref.startswith("#/") else (*path, "$ref")
            target = self.flatten(self.resolve(ref, (*path, "$ref")), at, depth + 1)
            out = self.merge(target, out, path)
        if "allOf" in out:
            parts = out.pop("allOf")
            for i, part in enumerate(parts):
                out = self.merge(out, self.flatten(part, (*path, "allOf", i), depth + 1), (*path, "allOf", i))
        return out

    def merge(self, a: dict[str, Any], b: dict[str, Any], path: Path) -> dict[str, Any]:
        """One schema that both ``a`` and ``b`` accept (their intersection), for the keywords a
        grammar supports; a pair it cannot merge is refused at ``path``."""
        out, b = _const_as_enum(a), _const_as_enum(b)
        self._merge_properties(out, a, b, path)
        for key, v in b.items():
            if key in ("properties", "additionalProperties"):
                continue
            if key not in out:
                out[key] = v
                continue
            u = out[key]
            if key in ANNOTATIONS or key.startswith("x-") or _same(u, v):
                continue
            if key == "type":
                ua = u if isinstance(u, list) else [u]
                va = v if isinstance(v, list) else [v]
                both = [t for t in ua if t in va]
                both += [t for t in ("integer",) if t not in both and
                         (("integer" in ua and "number" in va) or ("number" in ua and "integer" in va))]
                if not both:
                    raise self.refuse((*path, "type"), f"{json.dumps(u)} and {json.dumps(v)} have no type in common")
                out[key] = both if len(both) > 1 else both[0]
            elif key == "required":
                out[key] = list(dict.fromkeys([*u, *v]))
            elif key in ("$defs", "definitions"):
                merged = dict(u)
                for name, sub in v.items():
                    merged[name] = sub if name not in merged or _same(merged[name], sub) else \
                        {"allOf": [merged[name], sub]}
                out[key] = merged
            elif key in ("items", "additionalItems"):
                if u is False or v is False:
                    out[key] = False
                elif u is True or u == {}:
                    out[key] = v
                elif v is True or v == {}:
                    out[key] = u
                elif isinstance(u, dict) and isinstance(v, dict):
                    out[key] = {"allOf": [u, v]}
                else:
                    raise self.refuse((*path, key), "differs between the schemas `allOf` combines; give it once")
            elif key == "enum":
                out[key] = [x for x in u if any(_same(x, y) for y in v)]
                if not out[key]:
                    raise self.refuse((*path, key), "of the combined schemas have no value in common")
            elif key in ("minimum", "minLength", "minItems") and _is_number(u) and _is_number(v):
                out[key] = max(u, v)
            elif key in ("maximum", "maxLength", "maxItems") and _is_number(u) and _is_number(v):
                out[key] = min(u, v)
            elif key == "exclusiveMinimum" and _is_number(u) and _is_number(v):
                out[key] = max(u, v)
            elif key == "exclusiveMaximum" and _is_number(u) and _is_number(v):
                out[key] = min(u, v)
            elif key == "nullable":
                out[key] = bool(u) and bool(v)
            else:
                raise self.refuse((*path, key), "differs between the schemas `allOf` (or `$ref` and its siblings) "
                                  "combines, which constrained decoding cannot merge; give it once")
        return out

    def _merge_properties(self, out: dict[str, Any], a: dict[str, Any], b: dict[str, Any], path: Path) -> None:
        """``properties`` and ``additionalProperties`` of both, into ``out``. Each schema's
        ``additionalProperties`` speaks of the names its own ``properties`` leave out, so a name only
        one lists meets the other's ``additionalProperties`` (``false``: the name is out)."""
        if not any(k in x for x in (a, b) for k in ("properties", "additionalProperties")):
            return
        pa, pb = a.get("properties") or {}, b.get("properties") or {}
        xa, xb = a.get("additionalProperties", True), b.get("additionalProperties", True)
        props: dict[str, Any] = {}
        for name in dict.fromkeys([*pa, *pb]):
            sa, sb = pa.get(name, xa), pb.get(name, xb)
            if sa is False or sb is False:
                for req in (a.get("required") or [], b.get("required") or []):
                    if name in req:
                        raise self.refuse((*path, "required"), f"names {json.dumps(name)}, which the "
                                          "`additionalProperties: false` of a schema combined with it forbids; "
                                          "list it in that schema's `properties`")
                continue
            props[name] = _both(sa, sb)
        if props or "properties" in a or "properties" in b:
            out["properties"] = props
        addl = False if xa is False or xb is False else _both(xa, xb)
        if addl is True:
            out.pop("additionalProperties", None)
            if "additionalProperties" in a or "additionalProperties" in b:
                out["additionalProperties"] = True
        else:
            out["additionalProperties"] = addl

    # -- strings -------------------------------------------------------------------
    def string(self, s: dict[str, Any], path: Path, hint: str) -> str:
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if hi is not None and lo > hi:
            raise self.refuse((*path, "minLength"), f"({lo}) is more than `maxLength` ({hi}); no string fits")
        fmt, pattern = s.get("format"), s.get("pattern")
        if fmt is not None and pattern is not None:
            raise self.refuse((*path, "pattern"), "beside `format` is not supported; use one of them")
        if fmt is not None:
            f_lo, f_hi = FORMAT_LENGTHS[fmt]
            if lo > f_lo or (hi is not None and hi < f_hi):
                key = "minLength" if lo > f_lo else "maxLength"
                raise self.refuse((*path, key), f"cuts into the lengths of format {fmt} ({f_lo}..{f_hi} characters), "
                                  "which constrained decoding cannot combine; remove it")
            return self.define(f"{hint}-{fmt}", f'"\\"" {self.use("json-" + fmt)} "\\""')
        if pattern is not None:
            if "minLength" in s or "maxLength" in s:
                key = "minLength" if "minLength" in s else "maxLength"
                raise self.refuse((*path, key), "beside `pattern` is not supported; put the length into the pattern "
                                  "(`{m,n}`)")
            try:
                body = pattern_gbnf(pattern, self.define, self.use("json-char"))
            except PatternError as exc:
                raise self.refuse((*path, "pattern"), f"cannot be enforced by constrained decoding: {exc}; simplify "
                                  "the pattern or remove it") from None
            return self.define(f"{hint}-pattern", f'"\\"" {body} "\\""')
        if lo == 0 and hi is None:
            return self.use("json-string")
        chars = self.repeat(self.use("json-char"), lo, hi, f"{hint}-chars")
        return self.define(f"{hint}-string", f'"\\"" {chars} "\\""')

    # -- numbers ---------------------------------------------------------------------
    def _bounds(self, s: dict[str, Any]) -> tuple[tuple[float, bool] | None, tuple[float, bool] | None]:
        """(lower, upper) bounds as (value, exclusive), the tighter where several apply."""
        lower: tuple[float, bool] | None = None
        upper: tuple[float, bool] | None = None
        m, em = s.get("minimum"), s.get("exclusiveMinimum")
        x, ex = s.get("maximum"), s.get("exclusiveMaximum")
        cands_lo = []
        if m is not None:
            cands_lo.append((m, em is True))
        if _is_number(em):
            cands_lo.append((em, True))
        cands_hi = []
        if x is not None:
            cands_hi.append((x, ex is True))
        if _is_number(ex):
            cands_hi.append((ex, True))
        for value, excl in cands_lo:
            if lower is None or value > lower[0] or (value == lower[0] and excl):
                lower = (value, excl)
        for value, excl in cands_hi:
            if upper is None or value < upper[0] or (value == upper[0] and excl):
                upper = (value, excl)
        return lower, upper

    def integer(self, s: dict[str, Any], path: Path, hint: str) -> str:
        lower, upper = self._bounds(s)
        if lower is None and upper is None:
            return self.use("json-int")
        lo = None if lower is None else (math.floor(lower[0]) + 1 if lower[1] else math.ceil(lower[0]))
        hi = None if upper is None else (math.ceil(upper[0]) - 1 if upper[1] else math.floor(upper[0]))
        body = integer_range(lo, hi)
        if not body:
            raise self.refuse((*path, "maximum" if "maximum" in s else "exclusiveMaximum"),
                              "is below the minimum; no integer fits")
        return self.define(f"{hint}-int", body)

    def number(self, s: dict[str, Any], path: Path, hint: str) -> str:
        lower, upper = self._bounds(s)
        if lower is None and upper is None:
            return self.use("json-number")
        for bound, keys in ((lower, ("minimum", "exclusiveMinimum")), (upper, ("maximum", "exclusiveMaximum"))):
            if bound is not None and not _is_int(bound[0]) and not float(bound[0]).is_integer():
                key = next(k for k in keys if _is_number(s.get(k)))
                raise self.refuse((*path, key), f"is {bound[0]}; constrained decoding supports whole-number bounds on "
                                  "a `number` (any bounds on an `integer`); round it, or scale the value")
        lo = None if lower is None else int(lower[0])
        hi = None if upper is None else int(upper[0])
        body = number_range(lo, bool(lower and lower[1]), hi, bool(upper and upper[1]))
        if not body:
            raise self.refuse((*path, "maximum" if "maximum" in s else "exclusiveMaximum"),
                              "is below the minimum; no number fits")
        return self.define(f"{hint}-num", body)

    # -- objects -------------------------------------------------------------------
    def object(self, s: dict[str, Any], path: Path, hint: str) -> str:
        props: dict[str, Any] = s.get("properties") or {}
        required: list[str] = s.get("required") or []
        addl = s.get("additionalProperties")
        if not props and not required and (addl is None or addl is True or addl == {}):
            return self.use("json-object")
        entries: list[tuple[str, bool]] = []
        names = list(props) + [r for r in dict.fromkeys(required) if r not in props]
        for name in names:
            if name in props:
                sub, at = props[name], (*path, "properties", name)
            else:
                if addl is False:
                    raise self.refuse((*path, "required"), f"names {json.dumps(name)}, which `properties` does not "
                                      "list and `additionalProperties: false` forbids; add it to `properties`")
                sub, at = (addl if isinstance(addl, dict) else True), (*path, "additionalProperties")
            value = self.visit(sub, at, f"{hint}-{name}")
            key = gbnf_literal(json.dumps(name, ensure_ascii=False))
            kv = self.define(f"{hint}-{name}-kv", f'{key} json-ws ":" json-ws {value} json-ws')
            entries.append((kv, name in required))
        self.use("json-ws")
        extra = None
        if addl is not None and addl is not False:
            value = self.visit(addl, (*path, "additionalProperties"), f"{hint}-extra") if isinstance(addl, dict) \
                else self.use("json-value")
            key = self.not_strings(names, hint) if names else self.use("json-string")
            extra = self.define(f"{hint}-extra-kv", f'{key} json-ws ":" json-ws {value} json-ws')
        # after[i]: the entries from i on, once one was written (so each starts with a comma);
        # first[i]: the same with none written yet
        after = f'( "," json-ws {extra} )*' if extra else ""
        first = f"( {extra} {after} )?" if extra else ""
        for i in reversed(range(len(entries))):
            kv, req = entries[i]
            if req:
                a = f'"," json-ws {kv} {after}'.strip()
                f = f"{kv} {after}".strip()
            else:
                a = f'( "," json-ws {kv} )? {after}'.strip()
                f = f"{kv} {after}".strip() + (f" | {first}" if first else ' | ""')
            after = self.define(f"{hint}-after{i}", a) if i else ""
            first = self.define(f"{hint}-from{i}", f) if not (req and i == 0) else f
        return self.define(f"{hint}-object", f'"{{" json-ws {first} "}}"'.replace("  ", " "))

    def not_strings(self, names: list[str], hint: str) -> str:
        """A JSON string (with its quotes) whose value is none of ``names``: what may name a property
        ``additionalProperties`` allows beside the listed ones. Escapes may appear only once the key
        differs from every name (an escape could spell a listed name)."""
        trie: dict[str, Any] = {}
        for name in names:
            node = trie
            for ch in name:
                node = node.setdefault(ch, {})
            node[""] = {}
        rest = self.define(f"{hint}-key-rest", f'{self.use("json-char")}* "\\""')

        def rule(node: dict[str, Any], depth: int) -> str:
            alts = []
            children = [c for c in node if c]
            for ch in children:
                enc = json.dumps(ch, ensure_ascii=False)[1:-1]
                alts.append(f"{gbnf_literal(enc)} {rule(node[ch], depth + 1)}")
            other = intersect(RAW_IN_STRING, _complement_chars(children))
            if other:
                alts.append(f"{char_class(other)} {rest}")
            if "" not in node:
                alts.append('"\\""')
            return self.define(f"{hint}-key{depth}", " | ".join(alts))

        return self.define(f"{hint}-key", f'"\\"" {rule(trie, 0)}')

    # -- arrays ----------------------------------------------------------------------
    def array(self, s: dict[str, Any], path: Path, hint: str) -> str:
        items = s.get("items")
        if isinstance(items, list):  # draft 7's tuples
            prefix, rest_schema, rest_key = items, s.get("additionalItems"), "additionalItems"
        else:
            if "additionalItems" in s:
                raise self.refuse((*path, "additionalItems"), "applies only beside a list of `items`; use `items` "
                                  "with `prefixItems`")
            prefix, rest_schema, rest_key = s.get("prefixItems") or [], items, "items"
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if hi is not None and hi < len(prefix):
            prefix = prefix[:hi]
        k = len(prefix)
        if rest_schema is False:
            hi = k if hi is None else min(hi, k)
        elif rest_schema is None and k:  # no items named past the tuple: write none unless minItems asks
            hi = max(k, lo) if hi is None else min(hi, max(k, lo))
        if hi is not None and lo > hi:
            raise self.refuse((*path, "minItems"), f"({lo}) is more than the items allowed ({hi}); no array fits")
        self.use("json-ws")
        elems = [self.visit(p, (*path, "prefixItems" if rest_key == "items" else "items", i), f"{hint}-{i}")
                 for i, p in enumerate(prefix)]
        rest = None
        if hi is None or hi > k:
            rest = self.visit(rest_schema, (*path, rest_key), f"{hint}-item") \
                if isinstance(rest_schema, dict) else self.use("json-value")
        if hi == 0:
            return self.define(f"{hint}-array", '"[" json-ws "]"')
        # the items past the tuple, each after a comma
        tail = ""
        if rest is not None:
            more = self.define(f"{hint}-more", f'"," json-ws {rest} json-ws')
            tail = self.repeat(more, max(0, lo - max(k, 1)), None if hi is None else hi - max(k, 1), f"{hint}-more")
        if k == 0:
            assert rest is not None
            body = f"{rest} json-ws {tail}".strip()
            inner = body if lo > 0 else f"( {body} )?"
            return self.define(f"{hint}-array", f'"[" json-ws {inner} "]"')
        after = tail
        for i in reversed(range(1, k)):
            seq = f'"," json-ws {elems[i]} json-ws {after}'.strip()
            after = self.define(f"{hint}-after{i}", seq if i < lo else f"( {seq} )?")
        first = f"{elems[0]} json-ws {after}".strip()
        inner = first if lo > 0 else f"( {first} )?"
        return self.define(f"{hint}-array", f'"[" json-ws {inner} "]"')


_WORD = re.compile(r"[A-Za-z0-9-]+")
_STRING_OR_CLASS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')


def _reachable(rules: dict[str, str], root: str) -> dict[str, str]:
    """The rules ``root`` uses (directly or not), in their order: merging and optional properties
    leave some written rules unused."""
    seen = {root}
    todo = [root]
    while todo:
        body = rules.get(todo.pop(), "")
        for word in _WORD.findall(_STRING_OR_CLASS.sub(" ", body)):
            if word in rules and word not in seen:
                seen.add(word)
                todo.append(word)
    return {name: body for name, body in rules.items() if name in seen}


def _pointer_path(ref: str) -> Path:
    """The path of the schema a ``#/...`` reference points at (``#/$defs/A`` -> ``$defs.A``)."""
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in unquote(ref[2:]).split("/"))


def _const_as_enum(s: dict[str, Any]) -> dict[str, Any]:
    """``const`` as a one-value ``enum`` (within ``enum`` if both are there), for merging."""
    if "const" not in s:
        return dict(s)
    out = {k: v for k, v in s.items() if k != "const"}
    values = [x for x in out.get("enum", [s["const"]]) if _same(x, s["const"])]
    out["enum"] = values
    return out


def _complement_chars(chars: list[str]) -> list[tuple[int, int]]:
    from .gbnf import complement

    return complement([(ord(c), ord(c)) for c in chars])


def _both(u: Any, v: Any) -> Any:
    """A schema both accept (``true`` and ``{}`` accept anything)."""
    if u is True or u == {}:
        return v
    if v is True or v == {} or _same(u, v):
        return u
    return {"allOf": [u, v]}


def _rep(item: str, lo: int, hi: int | None) -> str:
    if hi is None:
        return f"{item}*" if lo == 0 else f"{item}+" if lo == 1 else f"{item}{{{lo},}}"
    if hi == 0:
        return ""
    if lo == hi:
        return item if lo == 1 else f"{item}{{{lo}}}"
    if (lo, hi) == (0, 1):
        return f"{item}?"
    return f"{item}{{{lo},{hi}}}"


def _same(a: Any, b: Any) -> bool:
    """JSON equality (``1 == true`` is false here, ``1 == 1.0`` true)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or (
        _is_number(a) and _is_number(b) and a == b)


def iter_rules(text: str) -> Iterator[tuple[str, str]]:
    """(name, body) of each line of GBNF text this module wrote."""
    for line in text.splitlines():
        name, _, body = line.partition(" ::= ")
        yield name, body
