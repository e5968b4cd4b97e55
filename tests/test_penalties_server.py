"""Penalties and logit bias through the real clients (the official ``openai`` SDK and ``ollama``
client) against a real server on tiny models, the command line's flags and chat's ``/set``."""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from click.testing import CliRunner

from me_local.cli import cli
from me_local.cli.chat import ChatSession
from me_local.errors import RequestError
from me_local.server import ServerSettings

from .server_helpers import LiveServer, engine_loader, write_tiny_config

HELLO = [{"role": "user", "content": "Hello there"}]
PENALTIES = {"frequency_penalty": 1.0, "presence_penalty": 1.0}
EXTENSIONS = {"repeat_penalty": 1.5, "repeat_last_n": -1}


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_models):
    config = write_tiny_config(tmp_path_factory.mktemp("live"), tiny_models)
    server = LiveServer(ServerSettings(port=0), engine_loader(config)).start()
    yield server
    server.stop()


def ids(completion) -> list[int]:
    return [c.model_extra["id"] for c in completion.choices[0].logprobs.content]


def piece(oa, token: int) -> str:
    """A token's text (the tiny models share one vocabulary), read back with completions' echo."""
    echo = oa.completions.create(model="pair", prompt=[token], max_tokens=0, echo=True, logprobs=0)
    return echo.choices[0].logprobs.tokens[0]


def test_openai_logit_bias_forces_and_bans_a_token(oa):
    kw = dict(model="pair", messages=HELLO, max_tokens=6, temperature=0, logprobs=True)
    plain = ids(oa.chat.completions.create(**kw))
    forced = oa.chat.completions.create(**kw, logit_bias={"42": 100})
    assert ids(forced) == [42] * 6
    banned = ids(oa.chat.completions.create(**kw, logit_bias={str(plain[0]): -100}))
    assert banned[0] != plain[0] and plain[0] not in banned
    # completions take it too
    text = oa.completions.create(model="pair", prompt="Hi", max_tokens=3, temperature=0, logit_bias={"42": 100})
    assert piece(oa, 42) == "K" and text.choices[0].text == "KKK"


def test_openai_penalties_change_the_answer_and_count_every_token(oa):
    kw = dict(model="tiny", messages=HELLO, max_tokens=40, temperature=0, seed=3, logprobs=True, top_logprobs=1)
    plain = oa.chat.completions.create(**kw)
    pen = oa.chat.completions.create(**kw, **PENALTIES, extra_body=EXTENSIONS)
    assert ids(pen) != ids(plain)
    assert len(set(ids(pen))) > len(set(ids(plain)))
    # llama.cpp's chains picked what the reference's logprobs rank first, at every step of the ensemble
    assert ids(pen) == [c.top_logprobs[0].model_extra["id"] for c in pen.choices[0].logprobs.content]


@pytest.mark.parametrize(("kw", "param", "fragment"), [
    ({"logit_bias": {"x": 1}}, "logit_bias", "'x' is not a token id"),
    ({"logit_bias": {"5": -101}}, "logit_bias", "the bias of token 5 must be between -100 and 100"),
    ({"logit_bias": {"100000": 1}}, "logit_bias", "names token 100000, which is not in the vocabulary"),
    ({"frequency_penalty": -3}, "frequency_penalty", "must be between -2 and 2"),
    ({"extra_body": {"repeat_penalty": 0}}, "repeat_penalty", "must be between 0.01 and 100"),
])
def test_openai_bad_penalties_are_a_400_naming_the_field(oa, kw, param, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model="pair", messages=HELLO, max_tokens=2, **kw)
    assert err.value.status_code == 400 and err.value.body["param"] == param
    assert fragment in err.value.body["message"]


def test_ollama_options_are_the_same_penalties(ol, oa):
    """The Ollama options give what the OpenAI fields give (one table of settings, one sampler)."""
    options = {"temperature": 0, "num_predict": 40, **PENALTIES, **EXTENSIONS}
    ol.generate(model="solo", prompt="Hello world, the", raw=True, options=options)  # both below reuse its cache
    penalised = ol.generate(model="solo", prompt="Hello world, the", raw=True, options=options)
    same = oa.completions.create(model="solo", prompt="Hello world, the", max_tokens=40, temperature=0,
                                 **PENALTIES, extra_body=EXTENSIONS)
    assert penalised.response == same.choices[0].text
    plain = ol.generate(model="solo", prompt="Hello world, the", raw=True,
                        options={"temperature": 0, "num_predict": 40})
    assert plain.response != penalised.response
    forced = ol.chat(model="solo", messages=HELLO, logprobs=True,
                     options={"temperature": 0, "num_predict": 3, "logit_bias": {"42": 100}})
    assert forced.message.content == "KKK"
    off = ol.generate(model="solo", prompt="Hello world, the", raw=True,
                      options={"temperature": 0, "num_predict": 40, "repeat_last_n": 0, **PENALTIES})
    assert off.response == plain.response  # a window of 0 turns them off


def test_ollama_refuses_sparing_newlines(ol):
    with pytest.raises(ollama.ResponseError) as err:
        ol.chat(model="solo", messages=HELLO, options={"num_predict": 2, "penalize_newline": False})
    assert err.value.status_code == 400 and "penalize_newline: false" in err.value.error
    ok = ol.chat(model="solo", messages=HELLO, options={"num_predict": 2, "penalize_newline": True})
    assert ok.done_reason == "length"


# --------------------------------------------------------------------------- the command line, chat


def test_generate_flags(tmp_path, tiny_models):
    config = write_tiny_config(tmp_path, tiny_models)
    runner = CliRunner()
    base = ["generate", "--config", str(config), "-e", "solo", "--raw", "-t", "0", "-n", "4", "--json"]
    result = runner.invoke(cli, [*base, "--logit-bias", "42=100", "Hi"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [x["id"] for x in lines if "id" in x and x["id"] is not None] == [42] * 4
    plain = runner.invoke(cli, [*base, "Hello world, the"])
    pen = runner.invoke(cli, [*base, "--repeat-penalty", "1.5", "--repeat-last-n", "-1", "--frequency-penalty",
                              "1", "--presence-penalty", "1", "Hello world, the"])
    assert plain.exit_code == pen.exit_code == 0 and plain.output != pen.output
    for flag, value, fragment in (("--logit-bias", "42", "write a token id and its bias as ID=BIAS"),
                                  ("--logit-bias", "42=500", "the bias of token 42 must be between -100 and 100"),
                                  ("--repeat-penalty", "0", "0 is not in the range 0.01<=x<=100"),
                                  ("--repeat-last-n", "-2", "-2 is not in the range")):
        bad = runner.invoke(cli, [*base, flag, value, "Hi"])
        assert bad.exit_code == 2 and fragment in bad.output, bad.output


class _Members:
    def member_names(self) -> list[str]:
        return ["a", "b"]


def test_chat_set_takes_the_penalties_and_a_logit_bias():
    session = ChatSession(_Members(), {})
    session.set("repeat_penalty", "1.2")
    session.set("repeat_last_n", "-1")
    session.set("logit_bias", "13=-100, 7=2.5")
    assert session.settings == {"repeat_penalty": 1.2, "repeat_last_n": -1, "logit_bias": {13: -100.0, 7: 2.5}}
    session.set("logit_bias", "none")
    assert "logit_bias" not in session.settings
    with pytest.raises(RequestError, match="logit_bias: cannot read '13'; write a token id and its bias as ID=BIAS"):
        session.set("logit_bias", "13")
    with pytest.raises(RequestError, match=r"must be between 0\.01 and 100"):
        session.set("repeat_penalty", "0")


def test_chat_sends_them_to_a_daemon(live):
    """``me-local chat --url`` sends what ``/set`` set as the OpenAI fields (the bias's ids as strings)."""
    from me_local.cli.remote import Remote

    remote = Remote(live.url, ensemble="solo")
    try:
        settings = {"max_tokens": 3, "temperature": 0.0, "logit_bias": {42: 100.0}, "repeat_penalty": 1.1}
        text = "".join(ev.text for ev in remote.stream(HELLO, settings, []))
    finally:
        remote.close()
    assert text == "KKK"
