"""Tool calling's pure parts: reading calls out of answers (whole and streamed), the formats of
templates, the messages the templates render, and both APIs' tool fields."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from me_local.engine import normalize_messages
from me_local.errors import RequestError
from me_local.server.errors import ApiError
from me_local.server.tools import engine_messages, ollama_spec, openai_spec
from me_local.tools import (
    CallArguments,
    CallEnd,
    CallStart,
    Content,
    Tool,
    ToolParser,
    ToolSpec,
    common,
    detect,
    parse,
    prepare,
)

from .tool_templates import HERMES, LLAMA3

NAMES = ("get_weather", "add")


def ids():
    n = iter(range(1000))
    return lambda: f"call_{next(n)}"


def whole(fmt, text):
    content, calls = parse(fmt, NAMES, text, new_id=ids())
    return content, [(c.name, c.arguments, c.complete) for c in calls]


# --------------------------------------------------------------------------- reading answers


def test_hermes_calls_after_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>')
    assert whole("hermes", text) == ("Let me check.", [("get_weather", '{"city": "Paris", "days": [1, 2]}', True),
                                                       ("add", "{}", True)])


def test_an_answer_without_calls_is_its_text_exactly():
    for fmt in ("hermes", "llama3", "generic"):
        text = "  Plain <b>answer</b> with {braces} and <tool_ call>.\n\n"
        assert whole(fmt, text) == (text, [])


def test_a_call_of_no_tool_of_the_request_is_content():
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> done'
    assert whole("hermes", text) == (text, [])
    assert whole("llama3", '{"name": "rm_rf", "parameters": {}}') == ('{"name": "rm_rf", "parameters": {}}', [])


def test_calls_written_in_another_order_or_with_string_arguments_are_read_whole():
    assert whole("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>') == \
        ("", [("add", '{"a": 1}', True)])
    assert whole("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>') == \
        ("", [("add", '{"a": 2}', True)])


def test_an_answer_cut_inside_a_call_has_an_incomplete_call():
    content, calls = parse("hermes", NAMES, '<tool_call>{"name": "add", "arguments": {"a": "x', new_id=ids())
    assert content == "" and calls[0].arguments == '{"a": "x' and not calls[0].complete
    assert calls[0].parsed_arguments() is None
    # cut before the function's name is complete: nothing was a call yet
    assert whole("hermes", 'Hi <tool_call>{"na') == ('Hi <tool_call>{"na', [])


def test_llama3_bare_calls_with_parameters():
    assert whole("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo"}}') == \
        ("", [("get_weather", '{"city": "Oslo"}', True)])
    assert whole("llama3", '{"type": "function", "name": "add", "parameters": {"a": 1}}') == \
        ("", [("add", '{"a": 1}', True)])


def test_generic_response_is_decoded_content():
    text = '{"response": "Caf\\u00e9 \\ud83d\\ude00 said \\"hi\\"\\n\\ttab"}'
    assert whole("generic", text) == ('Café 😀 said "hi"\n\ttab', [])


def test_generic_calls():
    one = '{"tool_call": {"name": "add", "arguments": {"x": [1, {"y": "}"}]}}}'
    assert whole("generic", one) == ("", [("add", '{"x": [1, {"y": "}"}]}', True)])
    two = ('{"tool_calls": [{"name": "add", "arguments": {}}, '
           '{"name": "get_weather", "arguments": {"city": "Rome"}}]}')
    assert whole("generic", two) == ("", [("add", "{}", True), ("get_weather", '{"city": "Rome"}', True)])
    # other JSON stays as written; a call written bare is a call
    assert whole("generic", '{"other": 1}') == ('{"other": 1}', [])
    assert whole("generic", '{"name": "add", "arguments": {"k": 1}}') == ("", [("add", '{"k": 1}', True)])


def streamed(fmt, text, rng):
    """The events of ``text`` fed in random pieces, put together again."""
    parser = ToolParser(fmt, NAMES, new_id=ids())
    events = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        events += parser.feed(text[i : i + n])
        i += n
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls: dict[int, list] = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = [e.name, ""]
        elif isinstance(e, CallArguments):
            calls[e.index][1] += e.text
    ends = [e.index for e in events if isinstance(e, CallEnd)]
    return content, [tuple(c) for c in calls.values()], ends


ANSWERS = [
    ("hermes", 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": "x\\"}", "b": [1, {"c": null}]}}\n</tool_call>\n'
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Nice"}}</tool_call>'),
    ("hermes", "no calls at all, but a <tool_call mention"),
    ("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>'),
    ("llama3", 'x {"name": "get_weather", "parameters": {"city": "P\\u00e9"}}'),
    ("generic", '{"response": "line one\\nline \\u00e9 two "}'),
    ("generic", '{"tool_calls": [{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}]}'),
    ("generic", 'prose, not JSON'),
]


@pytest.mark.parametrize(("fmt", "text"), ANSWERS)
def test_streamed_pieces_add_up_to_the_whole_answer(fmt, text):
    content, calls = parse(fmt, NAMES, text, new_id=ids())
    expect = (content, [(c.name, c.arguments) for c in calls])
    rng = random.Random(f"{fmt}{text}")
    for _ in range(20):
        got_content, got_calls, ends = streamed(fmt, text, rng)
        assert (got_content, got_calls) == expect
        assert ends == [c.index for c in calls if c.complete]


def test_arguments_stream_as_they_are_written():
    parser = ToolParser("hermes", NAMES, new_id=ids())
    events = parser.feed('Hi<tool_call>{"name": "add", "arguments": {"a": 1')
    assert events == [Content("Hi"), CallStart(0, "call_0", "add"), CallArguments(0, '{"a": 1')]
    assert parser.feed(', "b": 2}}') == [CallArguments(0, ', "b": 2}'), CallEnd(0)]
    assert parser.feed("</tool_call>") == [] and parser.finish() == []


def test_a_possible_trigger_is_held_back_until_it_is_not_one():
    parser = ToolParser("hermes", NAMES)
    assert parser.feed("Hello <tool") == [Content("Hello")]
    assert parser.feed("box>") == [Content(" <toolbox>")]
    assert parser.finish() == []


# --------------------------------------------------------------------------- formats


def test_formats_are_read_from_the_template():
    from me_local.chat_templates import BUILTINS

    assert detect(HERMES) == "hermes" and detect(LLAMA3) == "llama3"
    assert {detect(b.text) for b in BUILTINS.values()} == {"generic"}
    assert common(["hermes", "hermes"]) == "hermes"
    assert common(["hermes", "llama3"]) == "generic" and common(["hermes", "generic"]) == "generic"


# --------------------------------------------------------------------------- prompts

WEATHER = Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}, "Weather now.")
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c2"},
    {"role": "tool", "content": "rain"},
    {"role": "user", "content": "Thanks"},
]


def test_the_tool_results_are_named_after_their_calls():
    msgs = normalize_messages(HISTORY)
    assert [m.get("name") for m in msgs[3:5]] == ["get_weather", "get_weather"]
    with pytest.raises(RequestError, match="only an assistant message makes calls"):
        normalize_messages([{"role": "user", "content": "x", "tool_calls": HISTORY[2]["tool_calls"]}])


@pytest.mark.parametrize(("messages", "param", "fragment"), [
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "18 C", "tool_call_id": "c1"}],
     "messages[1].role", "no assistant message with `tool_calls` comes right before it"),
    ([{"role": "tool", "content": "18 C"}], "messages[0].role", "or send the result as a user message"),
    ([*HISTORY[:2], {"role": "assistant", "content": "Sunny."}, {"role": "tool", "content": "18 C"}],
     "messages[3].role", "a tool message answers one of those calls"),
    ([*HISTORY[:5], {"role": "user", "content": "And Oslo?"}, {"role": "tool", "content": "snow"}],
     "messages[6].role", "comes right before it"),
    ([*HISTORY[:3], {"role": "tool", "content": "18 C", "tool_call_id": "zz"}],
     "messages[3].tool_call_id", "'zz', which none of the calls before it has (c1, c2)"),
])
def test_a_tool_result_must_answer_a_call_before_it(messages, param, fragment):
    """As OpenAI refuses them: a result that answers no call would reach the template as a result
    of nothing (or of whichever call stood at its position)."""
    with pytest.raises(RequestError) as e:
        normalize_messages(messages)
    assert e.value.param == param and fragment in e.value.message and "\n" not in e.value.message


def test_two_calls_of_one_message_may_not_share_an_id():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {}}}] * 2
    asked = {"role": "assistant", "content": "", "tool_calls": calls}
    with pytest.raises(RequestError) as e:
        normalize_messages([{"role": "user", "content": "x"}, asked])
    assert e.value.param == "messages[1].tool_calls" and "two calls have the id 'c1'" in e.value.message


def test_the_generic_prompt_writes_tools_and_calls_as_text():
    p = prepare(normalize_messages(HISTORY), ToolSpec((WEATHER,), parallel=False), "generic")
    assert p.tools is None and [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"]
    system = p.messages[0]["content"]
    assert system.startswith("Be brief.\n\nYou can call any of the following tools to satisfy the user's requests:\n")
    assert json.loads(system.split("requests:\n", 1)[1].split("\n\n")[0]) == [WEATHER.function()]
    assert "either with `tool_call` (a request to call tools) or with `response`" in system
    assert system.endswith('{"tool_call": {"name": "tool_name", "arguments": {"arg1": "some_value"}}}')
    assert json.loads(p.messages[2]["content"]) == {"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}}]}
    # both results and the next user message are one user turn (Gemma's template needs the roles to alternate)
    results = p.messages[3]["content"].split("\n\n")
    assert [json.loads(r) for r in results[:2]] == [{"tool_response": {"tool": "get_weather", "content": "sunny"}},
                                                    {"tool_response": {"tool": "get_weather", "content": "rain"}}]
    assert results[2] == "Thanks"
    assert p.labels[3] == "messages[3] (a tool result) + messages[4] (a tool result) + messages[5]"


def test_the_generic_prompt_without_tool_choice_keeps_the_history_only():
    p = prepare(normalize_messages(HISTORY), ToolSpec((WEATHER,), choice="none"), "generic")
    assert p.messages[0] == {"role": "system", "content": "Be brief."}
    required = prepare(normalize_messages(HISTORY[1:2]), ToolSpec((WEATHER,), choice="required"), "generic")
    assert "either" not in required.messages[0]["content"] and required.labels[0] == "the tools"
    assert "with `tool_calls` (a request to call tools).\n" in required.messages[0]["content"]


def test_a_native_template_gets_the_messages_and_tools_as_they_are():
    msgs = normalize_messages(HISTORY)
    p = prepare(msgs, ToolSpec((WEATHER,)), "hermes")
    assert p.messages == list(msgs) and p.tools == [WEATHER.openai()]
    assert prepare(msgs, ToolSpec((WEATHER,), choice="none"), "hermes").tools is None


# --------------------------------------------------------------------------- request fields

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def refused(fn, *args):
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert e.value.status == 400
    return e.value.param, e.value.message


def test_openai_tool_fields():
    spec = openai_spec({"tools": [TOOL, {**TOOL, "function": {"name": "sub"}}], "parallel_tool_calls": False})
    assert spec == ToolSpec((Tool("add", {"type": "object"}), Tool("sub", {"type": "object", "properties": {}})),
                            "auto", False)
    named = openai_spec({"tools": [TOOL, {**TOOL, "function": {"name": "sub"}}],
                         "tool_choice": {"type": "function", "function": {"name": "sub"}}})
    assert named is not None and named.names == ("sub",) and named.choice == "required"
    allowed = openai_spec({"tools": [TOOL, {**TOOL, "function": {"name": "sub"}}], "tool_choice": {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "required", "tools": [{"type": "function", "name": "add"}]}}})
    assert allowed is not None and allowed.names == ("add",) and allowed.choice == "required"
    assert openai_spec({"tool_choice": "auto"}) is None and openai_spec({"tools": []}) is None


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "only function tools"),
    ({"tools": [{**TOOL, "function": {"name": "a b"}}]}, "tools[0].function.name", "letters, digits"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name", "two tools are named 'add'"),
    ({"tools": [{**TOOL, "function": {"name": "a", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "an object"),
    ({"tools": [{**TOOL, "extra": 1}]}, "tools[0].extra", "not a field of a tool"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "zz"}}},
     "tool_choice.function.name", "not one of the request's tools (add)"),
    ({"tools": [TOOL], "tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "tool_choice.type", "custom"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice", "auto, none, required"),
    ({"tool_choice": "required"}, "tool_choice", "no `tools`"),
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
])
def test_openai_tool_fields_refused(body, param, fragment):
    got_param, message = refused(openai_spec, body)
    assert got_param == param and fragment in message


def test_ollama_tools_may_call_several():
    spec = ollama_spec({"tools": [TOOL]})
    assert spec == ToolSpec((Tool("add", {"type": "object"}),), "auto", True)


def test_each_apis_calls_in_the_history_become_object_arguments():
    oa = [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                "function": {"name": "add", "arguments": '{"a": 1}'}}]},
          {"role": "tool", "content": "1", "tool_call_id": "c"}]
    ol = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},
          {"role": "tool", "content": "1", "tool_name": "add"}]
    want = [{"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "1", "name": "add"}]
    got_oa = normalize_messages(engine_messages(oa, "openai"))
    assert got_oa[0]["tool_calls"][0].pop("id") == "c" and got_oa[1].pop("tool_call_id") == "c"
    assert got_oa == want
    assert normalize_messages(engine_messages(ol, "ollama")) == want
    bad = [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                 "function": {"name": "add", "arguments": "{oops"}}]}]
    param, message = refused(engine_messages, bad, "openai")
    assert param == "messages[0].tool_calls[0].function.arguments" and "is not valid JSON" in message
    obj = [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                 "function": {"name": "add", "arguments": {"a": 1}}}]}]
    param, message = refused(engine_messages, obj, "openai")
    assert "must be a string of JSON" in message


# pieces of the formats' syntax, so that random answers come near calls often
_BITS = ["<tool_call>", "</tool_call>", "\n", " ", '{"name": ', '"add"', '"get_weather"', '"zz"', ', "arguments": ',
         '"parameters": ', "{", "}", "[", "]", ",", ":", '"', "\\", '\\"', "\\u00e9", "\\ud83d", '{"tool_call": ',
         '{"tool_calls": [', '{"response": "', '{"type": "function", ', "x", "é", "1"]


@settings(max_examples=400, deadline=None, database=None)
@given(fmt=st.sampled_from(["hermes", "llama3", "generic"]), bits=st.lists(st.sampled_from(_BITS), max_size=30),
       cuts=st.lists(st.integers(1, 7), min_size=1, max_size=40))
def test_any_answer_reads_the_same_streamed_or_whole(fmt, bits, cuts):
    text = "".join(bits)
    content, calls = parse(fmt, NAMES, text, new_id=ids())
    parser = ToolParser(fmt, NAMES, new_id=ids())
    events, i, k = [], 0, 0
    while i < len(text):
        n = cuts[k % len(cuts)]
        events += parser.feed(text[i : i + n])
        i, k = i + n, k + 1
    events += parser.finish()
    assert "".join(e.text for e in events if isinstance(e, Content)) == content
    args: dict[int, str] = {}
    for e in events:
        if isinstance(e, CallArguments):
            args[e.index] = args.get(e.index, "") + e.text
    assert [(e.name) for e in events if isinstance(e, CallStart)] == [c.name for c in calls]
    assert [args.get(c.index, "") for c in calls] == [c.arguments for c in calls]
    for c in calls:
        assert c.name in NAMES and (not c.complete or c.parsed_arguments() is not None)
