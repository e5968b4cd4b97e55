"""Fill in the middle: the FIM tokens read from the GGUF, each member's FIM prompt (exact tokens, cuts),
llama-server's ``/infill`` with the bodies llama.vim and llama.vscode send, ``suffix`` through the
official ``openai`` and ``ollama`` clients, ``/api/show``'s ``insert`` and ``.Suffix``, the limits
(``n_indent``, ``t_max_predict_ms``), the infill sampler, and the clear error for models without FIM
tokens. The models are tiny ones fabricated with FIM tokens (tests/conftest.py ``tiny_fim_models``)."""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from me_local.backends.llama import LoadedModel
from me_local.config import load_config
from me_local.core import DoneEvent, GenerationStats, SamplingParams, TokenEvent
from me_local.engine import Engine, FimChunk, FimInput, LineLimits, Request
from me_local.engine.limits import LimitCheck, apply_limits
from me_local.errors import ContextOverflowError, RequestError
from me_local.fim import SNIPPET, FimTokens, fim_prompt, lacking_fim
from me_local.server import ServerSettings
from me_local.server.state import prompt_text

from .server_helpers import LiveServer, engine_loader, sse_frames

# --------------------------------------------------------------------------- the prompt, pure


class Chars:
    """A model whose tokens are the text's code points, with FIM tokens above them."""

    def __init__(self, fim: FimTokens, bos: int = -1, add_bos: bool = False) -> None:
        self.fim, self.bos, self.add_bos = fim, bos, add_bos

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        assert not add_special and not parse_special  # every part is text: never BOS, never markup
        return [ord(c) for c in text]


PRE, SUF, MID, REP, SEP = 1001, 1002, 1003, 1004, 1005
QWEN = FimTokens(pre=PRE, suf=SUF, mid=MID, rep=REP, sep=SEP)
CODELLAMA = FimTokens(pre=PRE, suf=SUF, mid=MID)


def t(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_a_plain_fim_prompt_is_prefix_suffix_middle():
    got = fim_prompt(Chars(QWEN), FimInput("def f(", "):\n"), n_ctx=100, reserve=10)
    assert got.tokens == [PRE, *t("def f("), SUF, *t("):\n"), MID]  # Ollama's template: no repository header
    assert not got.truncated
    with_bos = fim_prompt(Chars(CODELLAMA, bos=7, add_bos=True), FimInput("a", "b"), n_ctx=100, reserve=10)
    assert with_bos.tokens == [7, PRE, *t("a"), SUF, *t("b"), MID]


def test_infill_uses_llama_servers_repository_pattern_and_puts_prompt_after_the_prefix():
    fim = FimInput("x = ", "\n", "4", (FimChunk("a = 1\n", "a.py"), FimChunk("b = 2\n")), layout="repo")
    got = fim_prompt(Chars(QWEN), fim, n_ctx=1000, reserve=10)
    assert got.tokens == [REP, *t("myproject\n"), SEP, *t("a.py\n"), *t("a = 1\n"), SEP, *t("tmp\n"), *t("b = 2\n"),
                          SEP, *t("filename\n"), PRE, *t("x = "), *t("4"), SUF, *t("\n"), MID]
    # without repository and file tokens each chunk follows a snippet line; BOS comes after the extra context
    got = fim_prompt(Chars(CODELLAMA, bos=7, add_bos=True), fim, n_ctx=1000, reserve=10)
    assert got.tokens == [*t(SNIPPET), *t("a = 1\n"), *t(SNIPPET), *t("b = 2\n"), 7, PRE, *t("x = "), *t("4"), SUF,
                          *t("\n"), MID]
    assert got.kept == {"prefix": 4, "prompt": 1, "suffix": 1, "extra": 2 * len(SNIPPET) + 12}


def test_infill_cuts_each_part_farthest_from_the_gap_and_says_so():
    prefix = "".join(chr(0x100 + i) for i in range(100))
    suffix = "".join(chr(0x300 + i) for i in range(100))
    extra = "".join(chr(0x500 + i) for i in range(100))
    fim = FimInput(prefix, suffix, "QQQ", (FimChunk(extra),), layout="repo", fit=True)
    got = fim_prompt(Chars(CODELLAMA), fim, n_ctx=64, reserve=8)
    # room 64 - 8 - 3 markup = 53: prefix 3*(53//4) = 39, suffix 53//4 - 3 = 10, the extra context what is left
    assert got.tokens == [*t(extra[-1:]), PRE, *t(prefix[-39:]), *t("QQQ"), SUF, *t(suffix[:10]), MID]
    assert len(got.tokens) == 64 - 8
    assert got.kept == {"prefix": 39, "prompt": 3, "suffix": 10, "extra": 1}
    assert got.dropped == {"prefix": 61, "suffix": 90, "extra": len(SNIPPET) + 99} and got.truncated
    # a prompt that alone leaves no room is refused, naming it
    with pytest.raises(ContextOverflowError) as info:
        fim_prompt(Chars(CODELLAMA), FimInput("", "", "Q" * 60, layout="repo", fit=True), n_ctx=64, reserve=8)
    assert info.value.param == "prompt" and "`prompt` is 60 tokens" in str(info.value)
    # without fit nothing is cut (the engine refuses what does not fit)
    whole = fim_prompt(Chars(CODELLAMA), FimInput(prefix, suffix), n_ctx=64, reserve=8)
    assert len(whole.tokens) == 203 and not whole.truncated


def test_a_model_without_fim_tokens_is_named_with_what_it_lacks():
    smol = FimTokens(rep=4)  # SmolLM2: a repository token, no prefix, suffix or middle
    assert lacking_fim([("coder", "c.gguf", QWEN)]) is None
    assert lacking_fim([("coder", "c.gguf", QWEN), ("chat", "s.gguf", smol)]) == (
        "fill-in-the-middle needs models with FIM tokens, and member 'chat' (s.gguf: no FIM prefix/suffix/middle "
        "token) lacks them; use an ensemble (or ENSEMBLE/MEMBER) of FIM-capable models, such as code models "
        "trained for infilling (Qwen2.5-Coder, StarCoder2, CodeLlama)")
    assert "(x.gguf: no FIM middle token)" in (lacking_fim([("x", "x.gguf", FimTokens(pre=1, suf=2))]) or "")


def test_the_access_log_shows_where_the_gap_is():
    fim = FimInput("def f(", "):\n", "x", (FimChunk("y = 1\n", "y.py"),))
    assert prompt_text(Request(fim=fim)) == "[y.py]\ny = 1\ndef f(x<|gap|>):\n"


# --------------------------------------------------------------------------- the limits, pure


def test_n_indent_ends_the_answer_before_a_line_indented_less():
    check = LimitCheck(LineLimits(n_indent=4))
    assert check.feed("x = (") == "x = ("  # the first line continues the cursor's: never checked
    assert check.feed("1,\n  ") == "1,\n  " and not check.stopped  # indentation may come in pieces
    assert check.feed("  2,\n") == "  2,\n" and not check.stopped
    assert check.feed("  3)") == "  " and check.stopped  # cut before the line's text; its indentation stays
    blank = LimitCheck(LineLimits(n_indent=2))
    assert blank.feed("a\n\nb") == "a\n" and blank.stopped  # a line that ends at once is under-indented too


def test_t_max_predict_ms_stops_at_the_first_newline_after_the_time():
    now = [0.0]
    check = LimitCheck(LineLimits(t_max_predict_ms=1.0), clock=lambda: now[0])
    assert check.feed("a") == "a"  # the first token starts the clock
    now[0] = 0.0005
    assert check.feed("b\n") == "b\n" and not check.stopped  # a newline before the time
    now[0] = 0.002
    assert check.feed("cd") == "cd" and not check.stopped  # the time, but no newline
    assert check.feed("e\nf") == "e\nf" and check.stopped  # the token with the newline is kept whole


def test_a_limit_ends_the_generation_as_a_token_limit_does():
    stats = GenerationStats(mode="me", seed=1)
    events = [TokenEvent(0, 5, "x\n", "one"), TokenEvent(1, 6, "y", "one"), DoneEvent("cancelled", stats)]
    stop = threading.Event()
    out = list(apply_limits(iter(events), LineLimits(n_indent=1), stop))
    assert stop.is_set()  # the loop's cancel flag: nothing is generated after the cut
    assert [e.text for e in out[:2]] == ["x\n", ""] and isinstance(out[2], DoneEvent)
    assert out[2].finish_reason == "length" and out[2].stats is stats


# --------------------------------------------------------------------------- real models

CONFIG = """
ensembles:
  coder:
    mode: me
    n_ctx: 512
    sampling: {{max_tokens: 16, temperature: 0}}
    members:
      - {{name: one, path: {afim1}, weight: 1, n_threads: 1}}
      - {{name: two, path: {afim2}, weight: 1, n_threads: 1}}
  mixed:
    n_ctx: 512
    sampling: {{max_tokens: 16}}
    members:
      - {{name: qwen, path: {afim1}, n_threads: 1}}
      - {{name: llama, path: {sfim1}, n_threads: 1}}
  partly:
    n_ctx: 256
    members:
      - {{name: coder, path: {afim1}, n_threads: 1}}
      - {{name: chat, path: {a1}, n_threads: 1}}
  small:
    n_ctx: 96
    sampling: {{max_tokens: 8}}
    members:
      - {{name: one, path: {afim1}, n_threads: 1}}
  plain:
    n_ctx: 256
    members:
      - {{name: one, path: {a1}, n_threads: 1}}
"""


@pytest.fixture(scope="module")
def fim_config(tmp_path_factory, tiny_fim_models, tiny_models) -> Path:
    path = tmp_path_factory.mktemp("fim") / "models.yaml"
    path.write_text(textwrap.dedent(CONFIG.format(a1=tiny_models["a1"], **tiny_fim_models)))
    return path


@pytest.fixture(scope="module")
def vocab(tiny_fim_models):
    """The FIM models' vocabularies (no weights), to compute the expected prompts independently."""
    loaded = {k: LoadedModel(p, vocab_only=True) for k, p in tiny_fim_models.items()}
    yield loaded
    for m in loaded.values():
        m.close()


def text_tokens(model: LoadedModel, text: str) -> list[int]:
    return model.tokenize(text, add_special=False, parse_special=False)


def test_the_fim_tokens_come_from_the_gguf(vocab, tiny_models):
    def texts(m: LoadedModel) -> dict[str, bytes | None]:
        ids = {k: getattr(m.fim, k) for k in ("pre", "suf", "mid", "pad", "rep", "sep")}
        return {k: m.token_texts[i] if i >= 0 else None for k, i in ids.items()}

    assert texts(vocab["afim1"]) == {"pre": b"<|fim_prefix|>", "suf": b"<|fim_suffix|>", "mid": b"<|fim_middle|>",
                                     "pad": b"<|fim_pad|>", "rep": b"<|repo_name|>", "sep": b"<|file_sep|>"}
    assert texts(vocab["sfim1"]) == {"pre": b"<PRE>", "suf": b"<SUF>", "mid": b"<MID>", "pad": None, "rep": None,
                                     "sep": None}
    # llama.cpp ends a generation at the padding, repository and file tokens, as at EOS
    assert all(vocab["afim1"].is_eog(getattr(vocab["afim1"].fim, k)) for k in ("pad", "rep", "sep"))
    plain = LoadedModel(tiny_models["a1"], vocab_only=True)
    assert plain.fim == FimTokens() and not plain.fim.capable
    plain.close()


def test_every_member_builds_its_own_prompt_from_its_fim_tokens(fim_config, vocab):
    """Two FIM members with different vocabularies and formats (Qwen's with repository tokens, CodeLlama's
    with BOS and no file tokens): each gets exactly its own prompt; code that spells FIM markup stays text."""
    prefix, cursor = "# <|fim_middle|> and <MID> are text here\ndef add(a, b):\n", "    "
    suffix = "\n\nprint(add(1, 2))\n"
    extra = (FimChunk("def sub(a, b):\n    return a - b\n", "ops.py"),)
    engine = Engine(load_config(fim_config))
    try:
        fim = FimInput(prefix, suffix, cursor, extra, layout="repo", fit=True, param="model")
        _, plan = engine.plan_request(Request(ensemble="mixed", fim=fim, params=SamplingParams(max_tokens=8)))
    finally:
        engine.close()
    q, s = vocab["afim1"], vocab["sfim1"]
    qt, st = (lambda x: text_tokens(q, x)), (lambda x: text_tokens(s, x))
    expect_qwen = [q.fim.rep, *qt("myproject\n"), q.fim.sep, *qt("ops.py\n"), *qt(extra[0].text), q.fim.sep,
                   *qt("filename\n"), q.fim.pre, *qt(prefix), *qt(cursor), q.fim.suf, *qt(suffix), q.fim.mid]
    expect_llama = [*st(SNIPPET), *st(extra[0].text), s.bos, s.fim.pre, *st(prefix), *st(cursor), s.fim.suf,
                    *st(suffix), s.fim.mid]
    assert plan.prompts == [expect_qwen, expect_llama]
    assert plan.granularity == "word"
    assert expect_qwen.count(q.fim.mid) == 1 and expect_llama.count(s.fim.mid) == 1
    assert plan.fim["qwen"].tokens == expect_qwen and not plan.fim["llama"].truncated


# --------------------------------------------------------------------------- a live server

KEY = "k3y"


@pytest.fixture(scope="module")
def live(fim_config):
    server = LiveServer(ServerSettings(port=0, api_key=KEY), engine_loader(fim_config)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_key():
    """The oa and ol clients (conftest) send this key: the server wants one."""
    return KEY


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def infill(http: httpx.Client, body: dict[str, Any], path: str = "/infill") -> dict[str, Any]:
    resp = http.post(path, json=body)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def complete_ids(http: httpx.Client, model: str, ids: list[int], **kw: Any) -> dict[str, Any]:
    """/v1/completions with a prompt of token ids: what the model writes after exactly those tokens."""
    resp = http.post("/v1/completions", json={"model": model, "prompt": ids, **kw})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


LLAMA_VIM_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                    "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                    "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]


def llama_vim_body(prefix: str, middle: str, suffix: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What llama.vim's llama#fim sends (autoload/llama.vim, defaults: n_predict 128, top_k 40, top_p 0.90,
    the first request's t_max_predict_ms 250)."""
    return {"input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": middle,
            "n_predict": 128, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 250, "response_fields": LLAMA_VIM_FIELDS}


VIM_CHUNKS = [{"text": "def sub(a, b):\n    return a - b\n", "time": [1718000000, 123456], "filename": "ops.py"}]


def test_llama_vim_requests_are_answered(http):
    # its ring buffer update: extra context only, nothing to generate
    warm = {"input_prefix": "", "input_suffix": "", "input_extra": VIM_CHUNKS, "prompt": "", "n_predict": 0,
            "temperature": 0.0, "stream": False, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 1,
            "t_max_predict_ms": 1, "response_fields": [""]}
    assert infill(http, {**warm, "model": "coder"}) == {}  # no field is named "": llama-server answers {} too
    # its completion request, at the cursor in `    return |`
    body = llama_vim_body("def add(a, b):\n", "    return ", "\n\nprint(add(1, 2))\n", VIM_CHUNKS)
    answer = infill(http, {**body, "model": "mixed", "seed": 4})
    assert set(answer) == set(LLAMA_VIM_FIELDS)
    assert isinstance(answer["content"], str) and answer["content"]
    assert answer["truncated"] is False and answer["timings/predicted_n"] >= 1
    assert answer["tokens_cached"] >= answer["timings/prompt_n"] + answer["timings/predicted_n"]


def test_llama_vscode_requests_are_answered_in_llama_servers_shape(http):
    """What llama.vscode's LlamaServer.createRequestPayload sends (src/llama-server.ts)."""
    chunks = [{"text": "class Stack:\n    pass\n", "time": 1718000000000, "filename": "/src/stack.py"}]
    body = {"input_prefix": "def push(stack, x):\n", "input_suffix": "\n", "input_extra": chunks,
            "prompt": "    stack.", "n_predict": 12, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 2500, "model": "coder", "seed": 1}
    answer = infill(http, body)
    assert answer["stop"] is True and answer["model"] == "coder" and answer["index"] == 0
    assert answer["stop_type"] in ("eos", "limit") and answer["truncated"] is False
    assert answer["tokens_predicted"] == answer["timings"]["predicted_n"]
    assert isinstance(answer["content"], str) and answer["has_new_line"] == ("\n" in answer["content"])
    assert answer["generation_settings"]["samplers"] == ["top_k", "top_p", "infill"]
    assert answer["generation_settings"]["temperature"] == 1.0  # unlisted: off, as llama-server
    assert answer["generation_settings"]["seed"] == 1
    assert [m["name"] for m in answer["me_local"]["members"]] == ["one", "two"]
    assert set(answer["me_local"]["fim"]) == {"one", "two"}  # me mode: each member its own prompt
    assert answer["tokens_evaluated"] == answer["me_local"]["fim"]["one"]["tokens"]
    # its warm-up: the extra context with nothing to generate
    warm = {"input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
            "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1, "model": "coder"}
    cold = infill(http, warm)
    assert cold["content"] == "" and cold["tokens_predicted"] == 0 and cold["stop_type"] == "limit"
    assert cold["tokens_evaluated"] == cold["me_local"]["fim"]["one"]["tokens"] > 10
    streamed = http.post("/infill", json={**warm, "stream": True})
    assert [json.loads(f)["tokens_evaluated"] for f in sse_frames(streamed.content)] == [cold["tokens_evaluated"]]


def test_infill_gives_the_model_exactly_the_fim_prompt(http, vocab):
    """The text /infill writes is what the member writes after the expected tokens (greedy: one answer)."""
    q = vocab["afim1"]
    prefix, cursor, suffix = "total = 0\nfor x in range(10):\n", "    total", "\nprint(total)\n"
    expected = [q.fim.rep, *text_tokens(q, "myproject\n"), q.fim.sep, *text_tokens(q, "filename\n"), q.fim.pre,
                *text_tokens(q, prefix), *text_tokens(q, cursor), q.fim.suf, *text_tokens(q, suffix), q.fim.mid]
    answer = infill(http, {"model": "coder/one", "input_prefix": prefix, "prompt": cursor, "input_suffix": suffix,
                           "n_predict": 10, "temperature": 0})
    direct = complete_ids(http, "coder/one", expected, max_tokens=10, temperature=0)
    assert answer["content"] == direct["choices"][0]["text"] and answer["content"]
    assert answer["tokens_evaluated"] == len(expected) == direct["usage"]["prompt_tokens"]


def test_streamed_infill_is_llama_servers_events_and_equals_the_whole_answer(http):
    body = {"model": "mixed", "input_prefix": "def f(x):\n", "input_suffix": "\n", "n_predict": 12, "seed": 11}
    whole = infill(http, body)
    resp = http.post("/infill", json={**body, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(f) for f in sse_frames(resp.content)]  # no [DONE]: llama-server's /infill sends none
    parts, final = events[:-1], events[-1]
    assert all(e["stop"] is False and e["content"] for e in parts)
    assert [e["tokens_predicted"] for e in parts] == sorted(e["tokens_predicted"] for e in parts)
    assert final["stop"] is True and final["content"] == ""
    assert "".join(e["content"] for e in parts) == whole["content"]
    assert final["tokens_predicted"] == whole["tokens_predicted"] and final["stop_type"] == whole["stop_type"]


def test_a_long_context_is_cut_as_llama_server_cuts_it_and_reported(http, vocab):
    q = vocab["afim1"]
    prefix = "".join(f"x{i} = {i}\n" for i in range(200))
    answer = infill(http, {"model": "small", "input_prefix": prefix, "input_suffix": "\nend\n", "n_predict": 8,
                           "input_extra": [{"text": "y = 1\n" * 50, "filename": "y.py"}]})
    fim = answer["me_local"]["fim"]["one"]
    # n_ctx 96, 8 kept for the answer, 3 for the markup: 85, the prefix 3/4 of it (63), the suffix (whole: it is
    # under 1/4), the extra context the rest (its latest tokens)
    n_suffix = len(text_tokens(q, "\nend\n"))
    assert fim["kept"] == {"prefix": 63, "prompt": 0, "suffix": n_suffix, "extra": 85 - 63 - n_suffix}
    assert fim["dropped"]["prefix"] == len(text_tokens(q, prefix)) - 63 and fim["dropped"]["extra"] > 0
    assert answer["truncated"] is True and fim["tokens"] == answer["tokens_evaluated"] == 88
    resp = http.post("/infill", json={"model": "small", "input_prefix": "", "input_suffix": "", "prompt": "z" * 400})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    assert "`prompt` is" in resp.json()["error"]["message"]


def test_n_indent_and_t_max_predict_ms_cut_the_same_answer(http):
    """The limits only stop a generation: with the same seed, the answer is the unlimited one, cut."""
    base = {"model": "coder/one", "input_prefix": "if x:\n", "input_suffix": "", "n_predict": 64, "seed": 5,
            "temperature": 1.0, "stream": True}
    http.post("/infill", json=base)  # from here on every run evaluates the same (the prompt's last token, then
    resp = http.post("/infill", json=base)  # one token at a time): the same logits, the same draws
    pieces = [e["content"] for e in map(json.loads, sse_frames(resp.content))][:-1]
    full = "".join(pieces)
    first_nl = next(i for i, p in enumerate(pieces) if "\n" in p)
    start = full.index("\n") + 1
    assert first_nl > 0 and start < len(full), "this seed writes a newline after its first token, and more after it"
    indent = len(full[start:]) - len(full[start:].lstrip(" \t"))
    limited = infill(http, {**base, "stream": False, "n_indent": indent + 1})
    assert limited["content"] == full[:start + indent] and limited["stop_type"] == "limit"
    timed = infill(http, {**base, "stream": False, "t_max_predict_ms": 0.001})
    assert timed["content"] == "".join(pieces[:first_nl + 1]) and timed["stop_type"] == "limit"


def test_the_infill_sampler_is_applied_when_listed(http):
    """llama.cpp's infill sampler ends a generation when no text token keeps enough probability, which on
    these random models (no token above 20% after top-k/top-p) is at once: listed, every answer ends by
    the model's choice within two tokens; unlisted, every one runs to n_predict, both members drawn."""
    body = {"model": "coder", "input_prefix": "def push(stack, x):\n", "prompt": "    stack.", "input_suffix": "\n",
            "n_predict": 12, "top_k": 40, "top_p": 0.99}
    for seed in range(1, 6):
        on = infill(http, {**body, "seed": seed, "samplers": ["top_k", "top_p", "infill"]})
        assert on["stop_type"] == "eos" and on["tokens_predicted"] <= 2, (seed, on["content"])
        off = infill(http, {**body, "seed": seed, "samplers": ["top_k", "top_p"]})
        assert off["stop_type"] == "limit" and off["tokens_predicted"] == 12
        assert all(m["selected"] >= 1 for m in off["me_local"]["members"])  # me mode: both members write


def test_samplers_are_honoured_or_refused_by_name(http):
    ok = {"model": "coder", "input_prefix": "a = ", "input_suffix": "\n", "n_predict": 4}
    assert infill(http, {**ok, "samplers": "kpi", "seed": 2})["generation_settings"]["samplers"] == [
        "top_k", "top_p", "infill"]
    cases = [
        ({"samplers": ["top_p", "top_k"]}, "samplers", "puts top_k after top_p"),
        ({"samplers": ["top_k"], "top_p": 0.5}, "top_p", "`samplers` does not list top_p"),
        ({"samplers": ["mirostat"]}, "samplers", "'mirostat', which is not a sampler"),
        ({"samplers": ["top_p", "infill"]}, "samplers", "needs top_k between 1 and 1000 before it"),
        ({"samplers": ["top_k", "infill"], "ensemble": {"mode": "ce"}}, "samplers", "mode ce samples their mixture"),
        ({"input_extra": [{"filename": "a.py"}]}, "input_extra[0].text", "must be a string"),
        ({"input_extra": [{"text": "x", "path": "a.py"}]}, "input_extra[0].path", "not a field of an `input_extra`"),
        ({"lora": [{"id": 0, "scale": 0.5}]}, "lora", "(LoRA adapters) are not supported"),
        ({"input_prefix": None}, "input_prefix", "`input_prefix` is required"),
    ]
    for extra, param, fragment in cases:
        resp = http.post("/infill", json={**ok, **extra})
        assert resp.status_code == 400, (extra, resp.text)
        err = resp.json()["error"]
        assert err["param"] == param and fragment in err["message"], err


# --------------------------------------------------------------------------- suffix through the clients


def plain_fim(model: LoadedModel, prefix: str, suffix: str) -> list[int]:
    return [model.fim.pre, *text_tokens(model, prefix), model.fim.suf, *text_tokens(model, suffix), model.fim.mid]


def test_openai_completions_suffix_fills_in_the_middle(oa, http, vocab):
    prefix, suffix = "def area(r):\n    return ", " * r * r\n"
    full = oa.completions.create(model="coder", prompt=prefix, suffix=suffix, max_tokens=8, temperature=0, seed=1)
    direct = complete_ids(http, "coder", plain_fim(vocab["afim1"], prefix, suffix), max_tokens=8, temperature=0,
                          seed=1)  # the same member schedule
    assert full.choices[0].text == direct["choices"][0]["text"] and full.choices[0].text
    assert full.usage.prompt_tokens == len(plain_fim(vocab["afim1"], prefix, suffix))
    streamed = oa.completions.create(model="coder", prompt=prefix, suffix=suffix, max_tokens=8, temperature=0,
                                     seed=1, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    # a batch of prompts, one gap each
    batch = oa.completions.create(model="coder/two", prompt=[prefix, "x = "], suffix="\n", max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and all(c.text for c in batch.choices)


def test_ollama_generate_suffix_fills_in_the_middle(ol, http, vocab):
    prefix, suffix = "def area(r):\n    return ", " * r * r\n"
    options = {"num_predict": 8, "temperature": 0, "seed": 1}
    answer = ol.generate(model="coder:latest", prompt=prefix, suffix=suffix, options=options)
    direct = complete_ids(http, "coder", plain_fim(vocab["afim1"], prefix, suffix), max_tokens=8, temperature=0,
                          seed=1)
    assert answer.response == direct["choices"][0]["text"] and answer.response
    assert answer.prompt_eval_count == len(plain_fim(vocab["afim1"], prefix, suffix))
    # Continue sends `raw` too; the prompt is the same FIM prompt (never a chat template)
    raw = ol.generate(model="coder", prompt=prefix, suffix=suffix, raw=True, options=options)
    assert raw.response == answer.response
    # at the start of a file the prompt is empty: still a completion, not Ollama's "load" reply
    start = ol.generate(model="coder/one", prompt="", suffix="print(x)\n", options={"num_predict": 4})
    assert start.done_reason in ("stop", "length") and start.eval_count >= 1


def test_two_vocabularies_fill_in_the_middle_word_by_word(ol):
    answer = ol.generate(model="mixed", prompt="numbers = [1, 2, ", suffix="]\n",
                         options={"num_predict": 16, "seed": 5})
    assert answer.response and answer.done_reason in ("stop", "length")


# --------------------------------------------------------------------------- /api/show and the clear error


def test_api_show_says_insert_with_a_suffix_template_for_fim_models_only(ol):
    for name in ("coder", "mixed", "coder/two", "partly/coder"):
        show = ol.show(name)
        assert "insert" in show.capabilities and ".Suffix" in (show.template or ""), name
    assert "<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>" in ol.show("coder").template
    for name in ("plain", "partly", "partly/chat"):
        show = ol.show(name)
        assert "insert" not in show.capabilities and not show.template, name


def test_models_without_fim_tokens_get_a_clear_error_naming_them(oa, ol, http):
    message = ("member 'chat' (tiny-a-1.gguf: no FIM prefix/suffix/middle token) lacks them; use an ensemble "
               "(or ENSEMBLE/MEMBER) of FIM-capable models")
    with pytest.raises(openai.BadRequestError) as info:
        oa.completions.create(model="partly", prompt="x = ", suffix="\n", max_tokens=4)
    assert message in info.value.message and info.value.body["param"] == "suffix"
    with pytest.raises(ollama.ResponseError) as err:
        ol.generate(model="plain", prompt="x = ", suffix="\n")
    assert err.value.status_code == 400 and "member 'one' (tiny-a-1.gguf" in err.value.error
    resp = http.post("/models/partly/infill", json={"input_prefix": "x = ", "input_suffix": "\n"})
    assert resp.status_code == 400 and message in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"] == "model"
    # its FIM member alone works, through the model-scoped path llama.vim's endpoint setting can name
    assert infill(http, {"input_prefix": "x = ", "input_suffix": "\n", "n_predict": 2},
                  path="/models/partly/coder/infill")["tokens_predicted"] >= 1


@pytest.mark.smollm
def test_smollm2_has_no_fim_tokens_and_says_so(write_config, smollm_path):
    cfg = write_config(f"""
        ensembles:
          default:
            members: [{{name: smollm, path: {smollm_path}, n_threads: 1}}]
        """)
    engine = Engine(load_config(cfg))
    try:
        assert not engine.ensemble().members[0].model.fim.capable
        with pytest.raises(RequestError) as info:
            engine.plan_request(Request(fim=FimInput("def f(", "):\n", param="suffix")))
    finally:
        engine.close()
    assert info.value.param == "suffix"
    assert str(info.value).startswith(
        "fill-in-the-middle needs models with FIM tokens, and member 'smollm' (SmolLM2-135M-Instruct.Q4_1.gguf: "
        "no FIM prefix/suffix/middle token) lacks them")
