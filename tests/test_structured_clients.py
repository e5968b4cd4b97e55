"""Structured output end to end: the official ``openai`` and ``ollama`` clients and LangChain's
``with_structured_output`` against a real server on loopback, on the shipped models (SmolLM2-135M,
Gemma 3 270M, and the two-family default ensemble word by word). Every answer parses and validates
against its schema (jsonschema, pydantic); an answer cut by the token limit says its JSON is
incomplete. A 135M model can run away inside a string: the schemas bound their strings and the
seeds are ones that finish."""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
import yaml
from pydantic import BaseModel, Field

from me_local.config import packaged_config_path
from me_local.server import ServerSettings
from me_local.server.wire import INCOMPLETE_NOTE

from .server_helpers import LiveServer, engine_loader

pytestmark = pytest.mark.smollm

ASK = "Describe a pet as JSON with its name, kind and age."
MESSAGES = [{"role": "user", "content": ASK}]


class Pet(BaseModel):
    name: str = Field(max_length=20)
    kind: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
    },
    "required": ["name", "kind", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def live(tmp_path_factory, smollm_path, gemma_path):
    """The packaged models.yaml (its pkg:// paths made absolute) served on a free loopback port."""
    raw = yaml.safe_load(packaged_config_path().read_text())
    for ens in raw["ensembles"].values():
        for m in ens["members"]:
            m["path"] = str(gemma_path if "gemma" in m["path"] else smollm_path)
    path = tmp_path_factory.mktemp("structured") / "models.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    server = LiveServer(ServerSettings(port=0), engine_loader(path)).start()
    yield server
    server.stop()


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}


# --------------------------------------------------------------------------- openai


def test_openai_json_object(oa):
    for seed in (0, 2):
        full = oa.chat.completions.create(model="smollm", messages=MESSAGES, seed=seed, max_tokens=120,
                                          response_format={"type": "json_object"})
        assert isinstance(json.loads(full.choices[0].message.content), dict)
        assert full.choices[0].finish_reason == "stop"
        assert full.usage.model_extra["me_local"]["grammar"] == "complete"


def test_openai_json_schema_validates_streamed_or_not(oa):
    kw: dict[str, Any] = dict(model="smollm", messages=MESSAGES, max_tokens=150,
                              response_format=json_schema_format(SCHEMA))
    for seed in (0, 1, 2):
        full = oa.chat.completions.create(**kw, seed=seed)
        text = full.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
        assert full.choices[0].finish_reason == "stop"
    chunks = list(oa.chat.completions.create(**kw, seed=2, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.model_extra["me_local"]["grammar"] == "complete"


def test_openai_parse_with_a_pydantic_model(oa):
    names = set()
    for seed in (0, 1, 2, 3):
        answer = oa.chat.completions.parse(model="smollm", messages=MESSAGES, seed=seed, max_tokens=120,
                                           response_format=Pet)
        pet = answer.choices[0].message.parsed
        assert isinstance(pet, Pet)
        names.add(pet.name)
    assert len(names) > 1  # the seeds give different pets: the model writes them, not the grammar


def test_an_answer_cut_by_the_token_limit_says_its_json_is_incomplete(oa, ol, live):
    with pytest.raises(openai.LengthFinishReasonError):
        oa.chat.completions.parse(model="smollm", messages=MESSAGES, seed=0, max_tokens=6, response_format=Pet)
    full = oa.chat.completions.create(model="smollm", messages=MESSAGES, seed=0, max_tokens=6,
                                      response_format=json_schema_format(SCHEMA))
    assert full.choices[0].finish_reason == "length"
    ext = full.usage.model_extra["me_local"]
    assert (ext["grammar"], ext["note"]) == ("incomplete", INCOMPLETE_NOTE)
    with pytest.raises(json.JSONDecodeError):
        json.loads(full.choices[0].message.content)
    reply = ol.chat(model="smollm", messages=MESSAGES, format=SCHEMA, options={"seed": 0, "num_predict": 6})
    assert reply.done_reason == "length"
    # the ollama client keeps only Ollama's fields; the extension is in the JSON
    final = httpx.post(live.url + "/api/chat", json={"model": "smollm", "messages": MESSAGES, "format": SCHEMA,
                                                     "stream": False, "options": {"seed": 0, "num_predict": 6}}).json()
    assert final["message"]["content"] == reply.message.content and final["done_reason"] == "length"
    assert final["me_local"] == {"grammar": "incomplete", "note": INCOMPLETE_NOTE}


def test_llama_server_grammar_and_json_schema_on_completions(oa):
    prompt = "Q: Is the sky blue on a clear day? Answer yes or no.\nA:"
    for seed in (1, 2, 3):
        text = oa.completions.create(model="smollm", prompt=prompt, seed=seed, max_tokens=10,
                                     extra_body={"grammar": 'root ::= " " ("yes" | "no")'}).choices[0].text
        assert text in (" yes", " no")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    answer = oa.completions.create(model="smollm", prompt=prompt, seed=1, max_tokens=30,
                                   extra_body={"json_schema": schema})
    jsonschema.validate(json.loads(answer.choices[0].text), schema)
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model="smollm", prompt=prompt, max_tokens=3, extra_body={"grammar": "root ::= ("})
    assert err.value.body["param"] == "grammar"


def test_a_schema_keyword_the_grammar_cannot_follow_is_a_400_naming_it(oa):
    schema = {"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 5}}}
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model="smollm", messages=MESSAGES, response_format=json_schema_format(schema))
    assert err.value.body["param"] == "response_format.json_schema.schema.properties.age.multipleOf"


# --------------------------------------------------------------------------- ollama


def test_ollama_format_json_and_schema(ol, live):
    for seed in (0, 2):
        reply = ol.chat(model="smollm", messages=MESSAGES, format="json", options={"seed": seed, "num_predict": 120})
        assert isinstance(json.loads(reply.message.content), dict) and reply.done_reason == "stop"
    for seed in (0, 1, 2):
        reply = ol.chat(model="smollm", messages=MESSAGES, format=Pet.model_json_schema(),
                        options={"seed": seed, "num_predict": 120})
        Pet.model_validate_json(reply.message.content)
        assert reply.done_reason == "stop"
    reply = ol.generate(model="smollm", prompt=ASK, format=SCHEMA, options={"seed": 1, "num_predict": 150})
    jsonschema.validate(json.loads(reply.response), SCHEMA)
    # the ollama client refuses other formats itself; Ollama's server answers them with this
    resp = httpx.post(live.url + "/api/chat", json={"model": "smollm", "messages": MESSAGES, "format": "yaml"})
    assert resp.status_code == 400
    assert resp.json() == {"error": 'invalid format: "\\"yaml\\""; expected "json" or a valid JSON Schema object'}


# --------------------------------------------------------------------------- LangChain


def test_langchain_chat_openai_with_structured_output(live):
    from langchain_openai import ChatOpenAI

    for seed in (0, 1, 2):
        llm = ChatOpenAI(base_url=live.url + "/v1", api_key="none", model="smollm", seed=seed, max_tokens=120,
                         max_retries=0)
        out = llm.with_structured_output(Pet, include_raw=True).invoke(ASK)  # the default method: json_schema
        assert isinstance(out["parsed"], Pet) and out["parsing_error"] is None
        assert json.loads(out["raw"].content) == out["parsed"].model_dump()


def test_langchain_chat_ollama_with_structured_output(live):
    from langchain_ollama import ChatOllama

    for seed in (0, 1, 2):
        llm = ChatOllama(base_url=live.url, model="smollm", seed=seed, num_predict=120)
        out = llm.with_structured_output(Pet, include_raw=True).invoke(ASK)  # the default method: format = schema
        assert isinstance(out["parsed"], Pet) and out["parsing_error"] is None


# --------------------------------------------------------------------------- Gemma, and both families word by word


def test_gemma_writes_a_pydantic_model(oa):
    for seed in (0, 1):
        answer = oa.chat.completions.parse(model="gemma", messages=MESSAGES, seed=seed, max_tokens=120,
                                           response_format=Pet)
        assert isinstance(answer.choices[0].message.parsed, Pet)


def test_the_two_family_default_writes_a_schema_word_by_word(oa, ol):
    writers: set[str] = set()
    for seed in (0, 1):
        answer = oa.chat.completions.parse(model="default", messages=MESSAGES, seed=seed, max_tokens=120,
                                           response_format=Pet)
        assert isinstance(answer.choices[0].message.parsed, Pet)
        ext = answer.usage.model_extra["me_local"]
        assert ext["granularity"] == "word" and ext["grammar"] == "complete"
        writers |= {m["name"] for m in ext["members"] if m["selected"]}
    assert writers == {"smollm", "gemma"}
    reply = ol.chat(model="default", messages=MESSAGES, format=SCHEMA, options={"seed": 1, "num_predict": 150})
    jsonschema.validate(json.loads(reply.message.content), SCHEMA)
