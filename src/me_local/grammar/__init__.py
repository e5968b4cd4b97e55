"""Grammars for constrained decoding, as GBNF text (llama.cpp's grammar format): JSON Schema to
GBNF (:func:`schema_grammar`), any JSON object (:data:`JSON_OBJECT_GBNF`), literals
(:func:`gbnf_literal`). Pure Python: nothing here imports llama_cpp."""

from .gbnf import JSON_OBJECT_GBNF, gbnf_literal
from .schema import json_type_name, schema_grammar

__all__ = ["JSON_OBJECT_GBNF", "gbnf_literal", "json_type_name", "schema_grammar"]
