"""Tool calling through the HTTP layer with the official ``openai`` and ``ollama`` clients, against a
real server whose members are fakes that write a scripted answer (tests/fakes.py): the wire shapes
of calls (whole and streamed), what reaches each member's template, tool_choice, the capability
check. The real models' calls, under the grammar, are in test_tools_models.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import ollama
import openai
import pytest

from me_local.backends.llama.chat_template import render
from me_local.server import ServerSettings

from .fakes import EngineMember, FakeFactory
from .server_helpers import LiveServer, engine_loader
from .tool_templates import HERMES, LLAMA3, NO_SYSTEM

EOG = 256


class ScriptedMember(EngineMember):
    """A fake member whose vocabulary is the 256 bytes and an end token, and whose answer to any
    prompt is its factory's ``answer`` (then the end)."""

    def __init__(self, name: str, factory: ScriptedFactory, **kw: Any) -> None:
        super().__init__(name, factory, n_vocab=EOG + 1, pieces=[bytes([b]) for b in range(256)] + [b""], eog=EOG,
                         **kw)

    def chat_prompt(self, messages, *, tools=None, labels=None) -> list[int]:
        """The rendering of its chat template (whose errors are the real ones), as bytes."""
        self._factory.prompts.append((list(messages), tools))
        text = render(self.model.template(self.chat_template).text, messages, eos_text="", bos_text="",
                      who=f"the chat template of {self.name}", tools=tools)
        self._factory.rendered.append(text)
        prompt = list(text.encode())
        self.script = [*self._factory.answer.encode(), EOG]
        self.script_offset = len(prompt)
        return prompt

    def raw_prompt(self, text: str) -> list[int]:
        return list(text.encode())


class ScriptedFactory(FakeFactory):
    def __init__(self) -> None:
        super().__init__(n_ctx=None)
        self.answer = ""
        self.rendered: list[str] = []

    def __call__(self, mc: Any, ens: Any) -> ScriptedMember:
        return ScriptedMember(mc.name, self, chat_template=mc.chat_template, n_ctx=ens.n_ctx)


def member(name: str, template: str | None = None) -> dict[str, Any]:
    return {"name": name, "path": f"/nowhere/{name}.gguf", **({"chat_template": template} if template else {})}


CONFIG = {"ensembles": {
    "hermes": {"n_ctx": 4096, "members": [member("h", HERMES)]},
    "plain": {"n_ctx": 4096, "members": [member("p")]},
    "mixed": {"n_ctx": 4096, "members": [member("h", HERMES), member("l", LLAMA3)]},
    "nosys": {"n_ctx": 4096, "members": [member("n", NO_SYSTEM)]},
}}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def factory():
    return ScriptedFactory()


@pytest.fixture(scope="module")
def live(tmp_path_factory, factory):
    path = tmp_path_factory.mktemp("tools") / "models.yaml"
    path.write_text(json.dumps(CONFIG))  # YAML reads JSON
    server = LiveServer(ServerSettings(port=0), engine_loader(path, factory)).start()
    yield server
    server.stop()


@pytest.fixture
def answer(factory):
    def set_answer(text: str) -> ScriptedFactory:
        factory.answer = text
        factory.prompts.clear()
        return factory

    return set_answer


def test_openai_call_whole(oa, answer):
    f = answer("Let me look.\n" + HERMES_CALL)
    r = oa.chat.completions.create(model="hermes", messages=ASK, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'
    assert call.id.startswith("call_") and len(call.id) == 29
    # the template was given the tools as OpenAI's list, the messages as they came
    messages, tools = f.prompts[-1]
    assert tools == [WEATHER] and messages == ASK
    assert f'<tools>\n{json.dumps(WEATHER)}\n</tools>' in f.rendered[-1]


def test_openai_call_streamed_reassembles(oa, answer):
    answer(HERMES_CALL + "\n" + HERMES_CALL.replace("Paris", "Rome"))
    whole = oa.chat.completions.create(model="hermes", messages=ASK, tools=[WEATHER]).choices[0].message
    chunks = list(oa.chat.completions.create(model="hermes", messages=ASK, tools=[WEATHER], stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    firsts = [d for d in deltas if d.id is not None]
    assert [(d.index, d.type, d.function.name, d.function.arguments) for d in firsts] == \
        [(0, "function", "get_weather", ""), (1, "function", "get_weather", "")]
    assert all(d.id is None and d.function.name is None for d in deltas if d not in firsts)
    assert len(deltas) > 4  # the arguments came in fragments
    args = {i: "".join(d.function.arguments for d in deltas if d.index == i) for i in (0, 1)}
    assert args == {i: tc.function.arguments for i, tc in enumerate(whole.tool_calls)}
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_ollama_call_whole_and_streamed(ol, answer):
    answer("Checking." + HERMES_CALL)
    r = ol.chat(model="hermes", messages=ASK, tools=[WEATHER])
    assert r.message.content == "Checking." and r.done_reason == "stop"
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(ol.chat(model="hermes", messages=ASK, tools=[WEATHER], stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and with_calls[0].message.tool_calls == r.message.tool_calls
    assert not with_calls[0].done and parts[-1].done and parts[-1].done_reason == "stop"
    assert "".join(p.message.content for p in parts) == "Checking."


def test_the_generic_format_for_templates_without_tools(oa, ol, answer):
    f = answer('{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}')
    r = oa.chat.completions.create(model="plain", messages=ASK, tools=[WEATHER], parallel_tool_calls=False)
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    messages, tools = f.prompts[-1]
    assert tools is None and messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("You can call any of the following tools")
    answer('{"response": "It is \\"sunny\\" \\u2600"}')
    r = oa.chat.completions.create(model="plain", messages=ASK, tools=[WEATHER])
    assert r.choices[0].message.content == 'It is "sunny" \u2600' and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(p.message.content for p in ol.chat(model="plain", messages=ASK, tools=[WEATHER], stream=True))
    assert streamed == 'It is "sunny" \u2600'


def test_members_whose_formats_differ_take_the_generic_one(oa, answer):
    f = answer('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Bern"}}]}')
    r = oa.chat.completions.create(model="mixed", messages=ASK, tools=[WEATHER])
    assert [c.function.arguments for c in r.choices[0].message.tool_calls] == ['{"city": "Bern"}']
    assert {json.dumps(m) for m, _ in f.prompts[-2:]} == {json.dumps(f.prompts[-1][0])}  # both members alike
    assert f.prompts[-1][1] is None and "tool_calls" in f.prompts[-1][0][0]["content"]


def test_the_follow_up_turn_reaches_the_template(oa, ol, answer):
    f = answer("It is sunny in Paris.")
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = oa.chat.completions.create(model="hermes", messages=history, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    messages, _ = f.prompts[-1]
    assert messages[1]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1", "name": "get_weather"}
    ol_history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"}]
    assert ol.chat(model="hermes", messages=ol_history, tools=[WEATHER]).message.content == "It is sunny in Paris."
    assert f.prompts[-1][0][2] == {"role": "tool", "content": "sunny, 21 C", "name": "get_weather"}


def test_a_tool_result_without_its_call_is_refused(oa, ol, answer):
    answer("It is sunny in Paris.")
    orphan = [*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="hermes", messages=orphan, tools=[WEATHER])
    assert e.value.body["param"] == "messages[1].role"
    assert "no assistant message with `tool_calls` comes right before it" in e.value.body["message"]
    with pytest.raises(ollama.ResponseError) as e2:
        ol.chat(model="hermes", messages=[*ASK, {"role": "tool", "tool_name": "get_weather", "content": "sunny"}])
    assert e2.value.status_code == 400 and e2.value.error.startswith("`messages[1]` is a tool result")


def test_tool_choice_none_shows_no_tools_and_reads_no_calls(oa, answer):
    f = answer(HERMES_CALL)
    r = oa.chat.completions.create(model="hermes", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == HERMES_CALL and r.choices[0].message.tool_calls is None
    assert f.prompts[-1][1] is None


def test_a_model_that_cannot_carry_tools_says_so(oa, ol, live):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="nosys", messages=ASK, tools=[WEATHER])
    assert e.value.body["param"] == "tools"
    assert e.value.body["message"].startswith("nosys does not support tools; the chat template of member 'n'")
    with pytest.raises(ollama.ResponseError) as e2:
        ol.chat(model="nosys:latest", messages=ASK, tools=[WEATHER])
    assert e2.value.status_code == 400 and e2.value.error.startswith("nosys:latest does not support tools")
    # without tools it answers as ever
    assert oa.chat.completions.create(model="nosys", messages=ASK).choices[0].finish_reason == "stop"
    caps = {name: ol.show(name).capabilities for name in ("hermes", "plain", "mixed", "nosys", "mixed/l")}
    assert caps == {"hermes": ["completion", "tools"], "plain": ["completion", "tools"],
                    "mixed": ["completion", "tools"], "nosys": ["completion"], "mixed/l": ["completion", "tools"]}


def test_what_tools_cannot_go_with(live):
    body = {"model": "hermes", "messages": ASK, "tools": [WEATHER]}
    r = httpx.post(live.url + "/v1/chat/completions", json={**body, "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = httpx.post(live.url + "/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = httpx.post(live.url + "/v1/chat/completions", json={**body, "tools": [{"type": "custom", "custom": {}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].type"
