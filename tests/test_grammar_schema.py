"""JSON Schema to GBNF (me_local.grammar): for many schemas, texts drawn at random from the
grammar parse as JSON and validate against the schema (jsonschema), and llama.cpp's own grammar
engine reads the grammar and takes those texts; texts outside the schema are refused; keywords
the grammar cannot enforce are a RequestError naming their path and the fix."""

from __future__ import annotations

import datetime
import enum
import json
import random
import re
import uuid
from decimal import Decimal
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from me_local.errors import RequestError
from me_local.grammar import JSON_OBJECT_GBNF, gbnf_literal, schema_grammar
from me_local.grammar.numbers import integer_range, number_range

from .gbnf_tools import Gbnf, LlamaGrammarCheck

PARAM = "response_format.json_schema.schema"


@pytest.fixture(scope="module")
def llama(smollm_path):
    check = LlamaGrammarCheck(smollm_path)
    yield check
    check.close()


_RFC3339_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
FORMAT_CHECKER = jsonschema.FormatChecker()


@FORMAT_CHECKER.checks("time")
def _is_time(value: object) -> bool:
    return not isinstance(value, str) or re.fullmatch(_RFC3339_TIME, value) is not None


@FORMAT_CHECKER.checks("date-time")
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    date, _, time = value.partition("T")
    return re.fullmatch(_RFC3339_TIME, time) is not None and datetime.date.fromisoformat(date) is not None


@FORMAT_CHECKER.checks("date", raises=ValueError)
def _is_date(value: object) -> bool:
    return not isinstance(value, str) or (len(value) == 10 and datetime.date.fromisoformat(value) is not None)


@FORMAT_CHECKER.checks("uuid", raises=ValueError)
def _is_uuid(value: object) -> bool:
    return not isinstance(value, str) or str(uuid.UUID(value)) == value.lower()


def without_nullable(schema: Any) -> Any:
    """OpenAPI's ``nullable: true`` (which jsonschema does not know) written as JSON Schema says it."""
    if isinstance(schema, list):
        return [without_nullable(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: without_nullable(v) for k, v in schema.items() if k != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") is True else out


def validate(schema: dict[str, Any], text: str) -> Any:
    schema = without_nullable(schema)
    value = json.loads(text)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls(schema, format_checker=FORMAT_CHECKER).validate(value)
    return value


def draws(schema: Any, n: int = 150, seed: int = 0) -> tuple[str, list[str]]:
    gbnf = schema_grammar(schema, param=PARAM)
    g = Gbnf(gbnf)
    rng = random.Random(seed)
    return gbnf, [g.sample(rng) for _ in range(n)]


# --------------------------------------------------------------------------- schemas that convert


class Color(enum.Enum):
    red = "red"
    green = "green"


class Address(BaseModel):
    street: str = Field(max_length=40)
    zip: Annotated[int, Field(ge=1000, le=99999)]


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150, description="years")
    color: Color
    nick: str | None = None
    addresses: list[Address]
    pet: Cat | Dog = Field(discriminator="kind")
    born: datetime.date
    wakes: datetime.time
    seen: datetime.datetime
    id: uuid.UUID
    score: float = Field(ge=0, le=1)
    meta: dict[str, int]
    pair: tuple[int, str]


class Tree(BaseModel):
    value: int
    children: list[Tree] = []


class Reading(BaseModel):
    celsius: float = Field(gt=-50, lt=60)
    station: str = Field(pattern=r"^[A-Z]{2}\d{1,6}$")
    level: int = Field(gt=-3, le=1000)


def _strict(model: type[BaseModel]) -> dict[str, Any]:
    from openai.lib._pydantic import to_strict_json_schema

    return to_strict_json_schema(model)


SCHEMAS: dict[str, Any] = {
    "empty": {},
    "string": {"type": "string"},
    "string lengths": {"type": "string", "minLength": 2, "maxLength": 5},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean or null": {"type": ["boolean", "null"]},
    "nullable": {"type": "string", "maxLength": 3, "nullable": True},
    "enum mixed": {"enum": ["a\"b", 1, 2.5, None, True, {"k": [1]}, "é\n"]},
    "const": {"const": "fixed"},
    "enum typed": {"type": "string", "enum": ["x", 3, "y"]},
    "object": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 4}},
               "required": ["a"]},
    "object all optional": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"},
                                                             "c": {"type": "integer"}}},
    "object closed": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
                      "additionalProperties": False},
    "object extra": {"type": "object", "properties": {"name": {"type": "integer"}, "nap": {"type": "boolean"}},
                     "additionalProperties": {"type": "string", "maxLength": 2}},
    "object extra any": {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": True},
    "map": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}},
    "empty object only": {"type": "object", "additionalProperties": False},
    "required not listed": {"type": "object", "required": ["x"]},
    "odd names": {"type": "object", "properties": {"a b": {"type": "integer"}, "\"q\"\\": {"type": "integer"},
                                                   "ü-1": {"type": "integer"}, "": {"type": "integer"}},
                  "required": ["a b", "\"q\"\\", "ü-1", ""]},
    "array": {"type": "array", "items": {"type": "integer"}},
    "array bounds": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "array any": {"type": "array"},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
    "tuple open": {"type": "array", "prefixItems": [{"const": 1}], "items": {"type": "boolean"}, "maxItems": 4},
    "tuple min": {"type": "array", "prefixItems": [{"const": 1}, {"const": 2}], "minItems": 3},
    "tuple short": {"type": "array", "prefixItems": [{"const": 1}, {"const": 2}, {"const": 3}], "maxItems": 2},
    "draft7 tuple": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
                     "items": [{"type": "integer"}, {"const": "x"}], "additionalItems": False},
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 5, "maximum": 7}, {"type": "string", "enum": ["n"]}]},
    "oneOf disjoint": {"oneOf": [{"type": "object", "properties": {"t": {"const": "a"}}, "required": ["t"],
                                  "additionalProperties": False},
                                 {"type": "object", "properties": {"t": {"const": "b"}, "v": {"type": "integer"}},
                                  "required": ["t", "v"], "additionalProperties": False}]},
    "anyOf with siblings": {"type": "object", "required": ["k"], "properties": {"k": {"type": "integer"}},
                            "anyOf": [{"properties": {"a": {"type": "string", "maxLength": 1}}, "required": ["a"]},
                                      {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"]},
                        {"properties": {"a": {"maximum": 3}, "b": {"type": "boolean"}}, "required": ["b"]}]},
    "allOf closed part": {"allOf": [{"type": "object", "properties": {"a": {"const": 1}, "c": {"type": "integer"}},
                                     "required": ["a"], "additionalProperties": False},
                                    {"properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}]},
    "allOf extra schema": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}},
                                      "additionalProperties": {"type": "string", "maxLength": 2}},
                                     {"properties": {"b": {}}, "required": ["b"]}]},
    "ref with siblings": {"$defs": {"N": {"type": "integer", "minimum": -5}}, "$ref": "#/$defs/N", "maximum": 5},
    "definitions": {"definitions": {"s": {"type": "string", "maxLength": 2}}, "type": "array",
                    "items": {"$ref": "#/definitions/s"}},
    "recursive": {"type": "object", "properties": {"v": {"type": "integer"},
                                                   "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
                  "required": ["v"]},
    "integer ranges": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -15, "maximum": 1234},
        "b": {"type": "integer", "exclusiveMinimum": 10},
        "c": {"type": "integer", "exclusiveMaximum": -2},
        "d": {"type": "integer", "minimum": 2.5, "maximum": 4.5},
        "e": {"type": "integer", "minimum": 1, "exclusiveMinimum": True, "maximum": 3}}},
    "number ranges": {"type": "object", "properties": {
        "a": {"type": "number", "minimum": 0, "maximum": 1},
        "b": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "c": {"type": "number", "minimum": -3, "exclusiveMaximum": 2},
        "d": {"type": "number", "maximum": -1},
        "e": {"type": "number", "exclusiveMinimum": -2}},
        "required": ["a", "b", "c", "d", "e"]},
    "huge bounds": {"type": "integer", "minimum": -1e300, "maximum": 9223372036854775807},
    "formats": {"type": "array", "prefixItems": [{"type": "string", "format": f} for f in
                                                 ("date", "time", "date-time", "uuid")],
                "minItems": 4},
    "format with fitting length": {"type": "string", "format": "date", "minLength": 10, "maxLength": 10},
    "format on an integer": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 3},
    "patterns": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": r"^\d{3}-[A-Z]{2}$"},
        "b": {"type": "string", "pattern": r"^(ab|c)+\.x?$"},
        "c": {"type": "string", "pattern": r"^[^\s\"\\]{1,4}$"},
        "d": {"type": "string", "pattern": r"ab"},
        "e": {"type": "string", "pattern": r"^\w+@\w+\.(com|org)$"},
        "f": {"type": "string", "pattern": r"^a|b$"},
        "g": {"type": "string", "pattern": r"^[\"\\\n\t]{2}\S?$"},
        "h": {"type": "string", "pattern": r"^(?:x(y)){2}.$"},
        "i": {"type": "string", "pattern": r"^[-a-c\]]{2,3}[.]\u00e9\x41$"},
    }, "required": list("abcdefghi")},
    "long string": {"type": "string", "minLength": 1500, "maxLength": 2600},
    "typeless keywords": {"properties": {"a": {"maxLength": 2}}, "required": ["a"]},
    "annotations": {"title": "T", "description": "d", "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "$id": "https://x/y", "examples": [1], "default": 1, "$comment": "c", "deprecated": False,
                    "readOnly": False, "writeOnly": False, "x-vendor": {"a": 1}, "type": "integer"},
    "uniqueItems false": {"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "maxItems": 3},
    "pydantic strict": _strict(Person),
    "pydantic": Person.model_json_schema(),
    "pydantic tree": Tree.model_json_schema(),
    "pydantic bounds": Reading.model_json_schema(),
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_text_the_grammar_draws_is_valid_and_llama_cpp_takes_it(name, llama):
    schema = SCHEMAS[name]
    gbnf, texts = draws(schema)
    assert llama.parses(gbnf), gbnf
    for text in texts:
        validate(schema, text)
    for text in texts[:25]:  # llama.cpp's engine agrees with the texts drawn here
        assert llama.run(gbnf, text) == "complete", (text, gbnf)


def test_the_draws_cover_the_schema():
    """The draws are not trivially the same text: optional properties come and go, enums vary."""
    _, texts = draws(SCHEMAS["object all optional"], 200)
    keys = {tuple(json.loads(t)) for t in texts}
    assert {(), ("a",), ("b",), ("c",), ("a", "b", "c")} <= keys
    _, texts = draws(SCHEMAS["enum mixed"], 200)
    assert len({t for t in texts}) == 7


def test_properties_keep_the_schemas_order_and_optional_ones_may_be_left_out():
    g = Gbnf(schema_grammar(SCHEMAS["object"], param=PARAM))
    assert g.matches('{"a": 1, "b": "xy"}')
    assert g.matches('{"a":1}')
    assert not g.matches('{"b": "xy", "a": 1}')  # the schema's order
    assert not g.matches('{"b": "xy"}')  # a is required
    assert not g.matches('{"a": 1, "c": 2}')  # no additionalProperties: no other property
    assert not g.matches('{"a": 1, "b": "xyzzy"}')  # maxLength 4


def test_allof_parts_keep_their_own_additional_properties():
    g = Gbnf(schema_grammar(SCHEMAS["allOf closed part"], param=PARAM))
    assert g.matches('{"a": 1, "c": 2}') and g.matches('{"a": 1}')
    assert not g.matches('{"a": 1, "b": true}')  # the first part allows no b
    g = Gbnf(schema_grammar(SCHEMAS["allOf extra schema"], param=PARAM))
    assert g.matches('{"a": "long", "b": "ok"}')
    assert not g.matches('{"a": "long", "b": "long"}')  # b meets the first part's additionalProperties


def test_ecma_named_groups_are_groups():
    g = Gbnf(schema_grammar({"type": "string", "pattern": r"^(?<x>ab)+$"}, param=PARAM))
    assert g.matches('"abab"') and not g.matches('"aba"')


def test_additional_properties_never_repeat_a_listed_name():
    g = Gbnf(schema_grammar(SCHEMAS["object extra"], param=PARAM))
    assert g.matches('{"name": 1, "nap": true, "na": "ok", "names": "x", "": "", "x\\"": "y"}')
    for key in ("name", "nap"):
        assert not g.matches(f'{{"name": 1, "{key}": "xy"}}')
    assert not g.matches('{"name": 1, "n\\u0061me": "xy"}')  # an escape could spell a listed name


@pytest.mark.parametrize("text, ok", [
    ('{"a": "x\\ny", "b": [1, -2.5e3, true, null, {"c": {}}]}', True),
    ('{"a": "x\ny"}', False),  # a raw newline inside a string is not JSON
    ('{"a": "\ty"}', False),
    ('{"a": "\\u00e9\\ud7ff"}', True),
    ('{"a": "\\ud800"}', False),  # a lone surrogate escape
    ("{\n" + " " * 20 + '"a": 1}', True),
    ("{\n" + " " * 21 + '"a": 1}', False),  # whitespace is bounded
    ('{"a": 1e999}', False),  # not infinity
    ('{"a": 1} ', False),  # nothing after the object
    ('[1]', False),  # an object
    ('{"a": 01}', False),
])
def test_json_object_grammar(text, ok, llama):
    assert Gbnf(JSON_OBJECT_GBNF).matches(text) is ok
    assert (llama.run(JSON_OBJECT_GBNF, text) == "complete") is ok


def test_json_object_draws_are_objects(llama):
    g = Gbnf(JSON_OBJECT_GBNF)
    rng = random.Random(3)
    for i in range(200):
        text = g.sample(rng)
        assert isinstance(json.loads(text), dict)
        if i < 20:
            assert llama.run(JSON_OBJECT_GBNF, text) == "complete"


@pytest.mark.parametrize("text", ["", "plain", 'q"uote\\back', "tab\tnew\nline\r", "\x00\x01\x7f", "é中😀", "[a-z]"])
def test_gbnf_literal_matches_exactly_its_text(text, llama):
    gbnf = f"root ::= {gbnf_literal(text)} \"!\"\n"
    g = Gbnf(gbnf)
    assert g.matches(text + "!")
    assert not g.matches(text + "?!")
    if "\x00" not in text and "\x01" not in text:  # SmolLM2 has no tokens for these bytes
        assert llama.run(gbnf, text + "!") == "complete"
        assert llama.run(gbnf, text + "x!") == "rejected"


def test_grammars_for_several_rules_concatenate(llama):
    a = schema_grammar({"type": "object", "properties": {"x": {"type": "integer", "maximum": 3}},
                        "required": ["x"]}, param="tools[0]", rule="call-a")
    b = schema_grammar({"type": "object", "properties": {"x": {"type": "string", "format": "date"}},
                        "required": ["x"]}, param="tools[1]", rule="call-b")
    gbnf = 'root ::= "A" call-a | "B" call-b\n' + a + b
    assert llama.parses(gbnf)
    g = Gbnf(gbnf)
    assert g.matches('A{"x": 3}') and g.matches('B{"x": "2024-02-28"}')
    assert not g.matches('A{"x": 4}') and not g.matches('B{"x": 3}')
    assert llama.run(gbnf, 'B{"x": "2024-02-28"}') == "complete"
    assert llama.run(gbnf, 'A{"x": 4}') == "rejected"


@pytest.mark.parametrize("lo, hi", [(None, 5), (-7, None), (-123, 4567), (0, 0), (13, 13), (99, 1000), (None, -3),
                                    (-1000, -10), (1, 9), (10, 99), (0, 100000)])
def test_integer_ranges_are_exact(lo, hi):
    g = Gbnf("root ::= " + integer_range(lo, hi) + "\n")
    for v in range(-1100, 5000):
        assert g.matches(str(v)) is ((lo is None or v >= lo) and (hi is None or v <= hi)), v
    for v in (lo, hi):
        if v is not None:
            assert g.matches(str(v))
    assert not g.matches("-0") and not g.matches("007") and not g.matches("+1")


NUMBER_CASES = [(0, False, 1, False), (0, True, 1, True), (-3, False, 2, True), (None, False, 0, True),
                (-5, True, None, False), (None, False, -2, False), (-2, True, -1, False), (7, False, 7, False),
                (-1, False, 0, False), (0, True, None, False)]


@pytest.mark.parametrize("lo, lo_excl, hi, hi_excl", NUMBER_CASES)
def test_number_ranges_never_leave_their_bounds(lo, lo_excl, hi, hi_excl):
    g = Gbnf("root ::= " + number_range(lo, lo_excl, hi, hi_excl) + "\n")
    texts = [f"{sign}{i}{frac}" for sign in ("", "-") for i in range(0, 9)
             for frac in ("", ".0", ".5", ".05", ".999", ".001", ".0000001")]
    accepted = 0
    for text in texts:
        d = Decimal(text)
        inside = (lo is None or (d > lo if lo_excl else d >= lo)) and (hi is None or (d < hi if hi_excl else d <= hi))
        if g.matches(text):
            accepted += 1
            assert inside, text
        elif inside and text not in ("-0", "-0.0") and not (d == int(d) and "." in text and not text.endswith(".0")):
            pytest.fail(f"{text} is within the bounds but refused")
    assert accepted


# --------------------------------------------------------------------------- schemas that are refused


def refused(schema: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        schema_grammar(schema, param=PARAM)
    err = info.value
    assert err.param is not None and err.param.startswith(PARAM)
    assert f"`{err.param}`" in err.message  # the message names the path too
    assert "\n" not in err.message
    return err


@pytest.mark.parametrize("schema, where, says", [
    ({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 5}}},
     ".properties.age.multipleOf", "divisibility"),
    ({"type": "array", "uniqueItems": True}, ".uniqueItems", "a list rather than a set"),
    ({"type": "object", "minProperties": 1}, ".minProperties", "`properties`"),
    ({"type": "object", "patternProperties": {"^x": {}}}, ".patternProperties", "`additionalProperties`"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, ".propertyNames", "property names"),
    ({"not": {"type": "string"}}, ".not", "describe what is allowed"),
    ({"if": {}, "then": {}}, ".if", "`anyOf`"),
    ({"type": "array", "contains": {"type": "integer"}}, ".contains", "`prefixItems`"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, ".dependentRequired", "`anyOf`"),
    ({"type": "object", "unevaluatedProperties": False}, ".unevaluatedProperties", "`additionalProperties`"),
    ({"type": "string", "contentEncoding": "base64"}, ".contentEncoding", "remove it"),
    ({"type": "string", "propertyOrdering": ["a"]}, ".propertyOrdering", "not a JSON Schema keyword"),
    ({"anyOf": [{"type": "string", "format": "email"}]}, ".anyOf[0].format", "`pattern`"),
    ({"type": "string", "format": "uri"}, ".format", "date, time, date-time, uuid"),
    ({"$defs": {"A": {"type": "integer", "multipleOf": 2}}, "$ref": "#/$defs/A"}, ".$defs.A.multipleOf", ""),
    ({"$defs": {"Unused": {"not": {}}}, "type": "integer"}, ".$defs.Unused.not", ""),
    ({"$ref": "https://example.com/s.json"}, ".$ref", "`$defs`"),
    ({"$ref": "#/$defs/Missing"}, ".$ref", "points at nothing"),
    ({"$ref": "#foo"}, ".$ref", "JSON pointer"),
    ({"type": "number", "minimum": 0.5}, ".minimum", "whole-number bounds"),
    ({"type": "number", "exclusiveMaximum": 2.25}, ".exclusiveMaximum", "whole-number bounds"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, ".maximum", "no integer fits"),
    ({"type": "string", "minLength": 5, "maxLength": 4}, ".minLength", "no string fits"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, ".minItems", "no array fits"),
    ({"type": "string", "pattern": r"^(?=a)b$"}, ".pattern", "lookahead"),
    ({"type": "string", "pattern": r"^(a)\1$"}, ".pattern", "back-references"),
    ({"type": "string", "pattern": r"\bword\b"}, ".pattern", "word boundary"),
    ({"type": "string", "pattern": r"^\p{L}+$"}, ".pattern", "Unicode property"),
    ({"type": "string", "pattern": r"(?i)^a$"}, ".pattern", "inline flags"),
    ({"type": "string", "pattern": r"^a{1,5000}$"}, ".pattern", "more than 1000"),
    ({"type": "string", "pattern": r"^a$b"}, ".pattern", "'$'"),
    ({"type": "string", "pattern": r"^[\x00-\x07]$"}, ".pattern", "control characters"),
    ({"type": "string", "pattern": "^(ab"}, ".pattern", "missing ')'"),
    ({"type": "string", "pattern": r"^a", "maxLength": 3}, ".maxLength", "into the pattern"),
    ({"type": "string", "format": "date", "pattern": "^2"}, ".pattern", "`format`"),
    ({"type": "string", "format": "time", "maxLength": 10}, ".maxLength", "lengths of format time"),
    ({"type": "object", "properties": {"a": False}}, ".properties.a", "`false`"),
    ({"type": "objekt"}, ".type", "must be one of"),
    ({"type": "object", "required": "a"}, ".required", "list of property names"),
    ({"enum": []}, ".enum", "non-empty"),
    ({"type": "string", "maxLength": -1}, ".maxLength", "non-negative"),
    ({"type": "string", "maxLength": 10**7}, ".maxLength", "at most"),
    ({"type": "integer", "enum": ["a"]}, ".enum", "no value"),
    ({"enum": [1, 2], "minimum": 1}, ".minimum", "beside `enum`"),
    ({"anyOf": [{"type": "string"}], "oneOf": [{"type": "string"}]}, ".oneOf", "one `anyOf`"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, ".allOf[1].type", "no type in common"),
    ({"allOf": [{"pattern": "^a"}, {"pattern": "^b"}]}, ".allOf[1].pattern", "give it once"),
    ({"type": "object", "required": ["x"], "additionalProperties": False}, ".required", "`properties`"),
    ({"type": "array", "items": {"type": "integer"}, "additionalItems": False}, ".additionalItems", "list of `items`"),
    ({"$defs": {"A": {"$ref": "#/$defs/B", "minimum": 1}, "B": {"$ref": "#/$defs/A", "maximum": 3}},
      "$ref": "#/$defs/A", "type": "integer"}, ".$defs.A", "nested too deeply"),
    ({"allOf": [{"type": "object", "properties": {"a": {}}, "additionalProperties": False},
                {"properties": {"b": {}}, "required": ["b"]}]}, ".allOf[1].required", "forbids"),
    ({"$defs": {"X": {"$ref": "#/$defs/X"}}, "$ref": "#/$defs/X"}, ".$defs.X.$ref", "loop"),
    ({"$defs": {"X": {"$ref": "#/$defs/Y"}, "Y": {"anyOf": [{"$ref": "#/$defs/X"}, {"type": "null"}]}},
      "$ref": "#/$defs/X"}, ".$defs.Y.anyOf[0].$ref", "before any value"),
    ({"anyOf": [{"type": "string"}, {"$ref": "#"}]}, ".anyOf[1].$ref", "through a property or an array item"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
      "$defs": {"A": {"oneOf": [{"$ref": "#/$defs/A"}]}}}, ".$defs.A.oneOf[0].$ref", "loop"),
    (["not", "an object"], "", "must be a JSON Schema"),
    (False, "", "`false`"),
])
def test_what_a_grammar_cannot_enforce_is_refused_naming_its_path(schema, where, says):
    err = refused(schema)
    assert err.param == PARAM + where
    assert says in err.message


def test_the_first_refused_keyword_is_named_before_anything_is_converted():
    err = refused({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3},
                                                    "b": {"type": "number", "multipleOf": 0.5}}})
    assert err.param == PARAM + ".properties.b.multipleOf"
    assert err.code == "unsupported_schema"
    assert err.message.startswith(f"`{PARAM}.properties.b.multipleOf` is not supported by constrained decoding")


def test_malformed_values_are_invalid_schema_errors():
    assert refused({"type": "string", "minLength": "3"}).code == "invalid_schema"


def test_a_schema_too_deep_for_the_walk_is_a_clear_error():
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    err = refused(schema)
    assert err.param == PARAM and "nested too deeply" in err.message


def test_a_bug_in_the_converter_is_a_request_error_not_a_crash(monkeypatch):
    from me_local.grammar import schema as module

    def broken(*args: Any) -> str:
        raise KeyError("boom")

    monkeypatch.setattr(module._Converter, "string", broken)
    err = refused({"type": "string"})
    assert err.param == PARAM and "KeyError" in err.message and "simplify the schema" in err.message


@pytest.mark.parametrize("kind", ["integer", "number"])
def test_bounds_beyond_a_float_are_followed_not_a_converter_bug(kind, llama, caplog):
    """JSON numbers have no size limit, and Python reads a long integer literal (``1e400``
    written out) as an int no float can hold: such a bound is followed, not a 400 from a
    converter bug (nor a traceback in the log)."""
    big = 10**400
    schema = {"type": kind, "minimum": -big, "maximum": big}
    with caplog.at_level("ERROR", logger="me_local.grammar"):
        gbnf = schema_grammar(schema, param=PARAM)
    assert not caplog.records  # no converter bug was caught and logged
    assert llama.parses(gbnf)
    g = Gbnf(gbnf)  # beyond what an unbounded side allows, as no bound (16 digits)
    for text in ("0", "-17", "9" * 16, "-" + "9" * 16):
        assert g.matches(text), text


def test_rule_names_must_be_gbnf_names():
    with pytest.raises(ValueError):
        schema_grammar({}, param=PARAM, rule="my_rule")


# --------------------------------------------------------------------------- random schemas


def _schemas() -> Any:
    from hypothesis import strategies as st

    def bounds(lo_max: int = 50) -> Any:
        return st.tuples(st.integers(-lo_max, lo_max), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1]))

    def integer(b: tuple[int, int], kinds: tuple[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        lo, hi = b
        if kinds[0] != "none":
            out["minimum" if kinds[0] == "incl" else "exclusiveMinimum"] = lo - (kinds[0] == "excl")
        if kinds[1] != "none":
            out["maximum" if kinds[1] == "incl" else "exclusiveMaximum"] = hi + (kinds[1] == "excl")
        return out

    side = st.sampled_from(["none", "incl", "excl"])
    leaves = st.one_of(
        st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
                  st.integers(0, 4), st.integers(0, 6)),
        st.sampled_from([{"type": "string", "format": f} for f in ("date", "time", "date-time", "uuid")]),
        st.sampled_from([{"type": "string", "pattern": p} for p in (r"^[a-z]{2,4}$", r"^\d+(\.\d\d)?$", r"x",
                                                                   r"^(?:ab|[^\s,])*$")]),
        st.builds(integer, bounds(), st.tuples(side, side)),
        st.builds(lambda b, k: {"type": "number", **({"minimum": b[0]} if k[0] else {}),
                                **({"exclusiveMaximum": b[1] + 1} if k[1] else {})},
                  bounds(), st.tuples(st.booleans(), st.booleans())),
        st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"type": "integer"}, {"type": "number"}, {},
                         {"enum": ["a", 1, None]}, {"const": {"k": [True]}}]),
    )

    def compound(children: Any) -> Any:
        names = st.sampled_from(["a", "b", "ab", "name", "x y", "é"])
        obj = st.builds(
            lambda props, req, addl: {"type": "object", "properties": props,
                                      "required": [n for n in props if n in req],
                                      **({} if addl == "absent" else {"additionalProperties": addl})},
            st.dictionaries(names, children, max_size=4), st.sets(names),
            st.one_of(st.sampled_from(["absent", True, False]), children))
        arr = st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo,
                                                 "maxItems": lo + extra}, children, st.integers(0, 2),
                        st.integers(0, 3))
        tup = st.builds(lambda items, rest: {"type": "array", "prefixItems": items,
                                             **({} if rest is None else {"items": rest})},
                        st.lists(children, min_size=1, max_size=3), st.one_of(st.none(), children))
        any_of = st.builds(lambda xs: {"anyOf": xs}, st.lists(children, min_size=1, max_size=3))
        nullable = st.builds(lambda x: {**x, "nullable": True} if "type" in x else x, children)
        return st.one_of(obj, arr, tup, any_of, nullable)

    return st.recursive(leaves, compound, max_leaves=8)


def test_random_schemas_convert_and_every_draw_validates(llama):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_schemas())
    def check(schema: dict[str, Any]) -> None:
        gbnf, texts = draws(schema, n=25)
        assert llama.parses(gbnf), gbnf
        for text in texts:
            validate(schema, text)
        assert llama.run(gbnf, texts[0]) == "complete", (texts[0], gbnf)

    check()
