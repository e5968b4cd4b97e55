"""Context sizes a request asks for (Ollama's ``options.num_ctx``): slots grow their contexts on
demand up to the ensemble's ``max_ctx``, a member never beyond its model's trained context, and a
conversation that does not fit leaves out its oldest turns (``truncate``), reported in the answer.
The engine on fake members, a real llama.cpp member's resize, and the Ollama route on tiny models."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from me_local.backends.llama import ContextSettings, LlamaMember, LoadedModel
from me_local.backends.llama import context as llama_context
from me_local.config import parse_config
from me_local.core import SamplingParams
from me_local.engine import Engine, Messages, Request, collect, fit_messages
from me_local.errors import ContextOverflowError, ModelLoadError, RequestError
from me_local.server import ServerState, create_app

from .conftest import _load_script
from .fakes import FakeFactory
from .server_helpers import engine_loader, ndjson_lines


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# --------------------------------------------------------------------------- leaving out the oldest turns


def _render(messages: Messages) -> list[int]:
    """A prompt of one token per character, and two per message for its markup."""
    return [0] * sum(len(m["content"]) + 2 for m in messages)


CONVERSATION = Messages([msg("system", "s" * 8), msg("user", "u1" * 9), msg("assistant", "a1" * 9),
                         msg("user", "u2" * 9), msg("assistant", "a2" * 9), msg("user", "u3")])
"""Prompt sizes: system 10, each turn 20 + 20, the latest message 4: 94 in all."""


@pytest.mark.parametrize(("budget", "dropped", "size"), [
    (94, 0, 94),   # fits: nothing left out
    (93, 2, 54),   # the oldest turn (a user message and its answer) goes whole
    (54, 2, 54),
    (53, 4, 14),   # then the next: the system message and the latest message stay
    (5, 4, 14),    # even those do not fit: the shortest prompt, for the caller to refuse
])
def test_the_oldest_turns_are_left_out_whole_until_the_prompt_fits(budget, dropped, size):
    prompt, n = fit_messages(CONVERSATION, _render, budget)
    assert (n, len(prompt)) == (dropped, size)


def test_system_messages_anywhere_stay_and_an_answer_being_continued_is_the_latest():
    messages = Messages([msg("user", "u1" * 9), msg("system", "later system"), msg("assistant", "a1" * 9),
                         msg("user", "u2"), msg("assistant", "prefill")])
    kept: list[Messages] = []

    def render(ms: Messages) -> list[int]:
        kept.append(ms)
        return _render(ms)

    prompt, n = fit_messages(messages, render, 30)
    assert n == 2 and kept[-1] == [messages[1], messages[3], messages[4]] and len(prompt) == 14 + 4 + 9
    _, n = fit_messages(messages, render, 10)  # down to the system message and the latest one
    assert n == 3


# --------------------------------------------------------------------------- the engine on fake members

CONFIG = """
ensembles:
  e:
    n_ctx: 32
    max_ctx: 128
    sampling: {max_tokens: 1000}
    members:
      - {name: one, path: /nowhere/a.gguf}
  duo:
    n_ctx: 32
    parallel: 2
    members:
      - {name: one, path: /nowhere/a.gguf}
      - {name: two, path: /nowhere/b.gguf}
"""


def engine(n_ctx_train: int = 0) -> tuple[Engine, FakeFactory]:
    factory = FakeFactory(n_ctx=None, n_ctx_train=n_ctx_train)
    return Engine(parse_config(CONFIG, Path("/nowhere/models.yaml")), factory), factory


def run(e: Engine, **kw):
    kw.setdefault("params", SamplingParams(seed=1, max_tokens=1000))
    return collect(e.generate(Request(**kw)))


def test_a_request_context_grows_its_slot_and_the_text_ends_there():
    e, factory = engine()
    prompt = "x" * 40  # 40 tokens: more than the ensemble's n_ctx of 32
    with pytest.raises(ContextOverflowError, match=r"40 tokens but member 'one' has a context of 32 tokens; "
                                                   r"shorten the prompt or raise n_ctx .* max_ctx 128"):
        run(e, ensemble="e", prompt=prompt)
    _, done = run(e, ensemble="e", prompt=prompt, n_ctx=100)
    assert factory.resized == [("one", 100)]
    assert done.finish_reason == "length" and done.stats.prompt_tokens + done.stats.generated_tokens == 100 + 1
    assert done.stats.members[0].n_ctx == 100 and done.stats.dropped_messages is None
    # a smaller context on the grown slot: no new context, the text ends at the size asked for
    _, done = run(e, ensemble="e", prompt=prompt, n_ctx=64)
    assert factory.resized == [("one", 100)] and done.stats.prompt_tokens + done.stats.generated_tokens == 64 + 1
    # no size asked for: the ensemble's n_ctx, as before (and nothing reported)
    _, done = run(e, ensemble="e", prompt="x" * 20)
    assert done.stats.prompt_tokens + done.stats.generated_tokens == 32 + 1 and done.stats.members[0].n_ctx is None


def test_only_the_members_that_run_grow_their_contexts():
    e, factory = engine()
    _, done = run(e, ensemble="duo", prompt="x" * 40, n_ctx=100, member="two")
    assert factory.resized == [("two", 100)] and done.stats.prompt_tokens + done.stats.generated_tokens == 101
    assert [m.n_ctx for m in done.stats.members] == [None, 100]


def test_more_than_max_ctx_is_refused_naming_it():
    e, _ = engine()
    with pytest.raises(RequestError, match=r"\(129 tokens\) is more than ensemble 'e' allows \(max_ctx 128\); "
                                           "ask for at most that, or raise max_ctx in models.yaml") as exc:
        run(e, ensemble="e", prompt="hi", n_ctx=129)
    assert exc.value.param == "num_ctx"
    # max_ctx unset: 32768, or n_ctx when that is larger
    assert e.config.get("duo").ctx_ceiling == 32768


def test_a_member_gets_at_most_its_trained_context():
    e, factory = engine(n_ctx_train=48)
    _, done = run(e, ensemble="e", prompt="x" * 40, n_ctx=128)
    assert factory.resized == [("one", 48)] and done.stats.members[0].n_ctx == 48
    assert done.stats.prompt_tokens + done.stats.generated_tokens == 48 + 1
    with pytest.raises(ContextOverflowError, match="has a context of 48 tokens for this request; that is its "
                                                   "model's trained context"):
        run(e, ensemble="e", prompt="x" * 60, n_ctx=128)


def test_a_conversation_that_does_not_fit_leaves_out_its_oldest_turns_when_asked():
    e, _ = engine()
    turns = [msg("system", "s" * 10)] + [msg(r, r[0] * 30) for r in ("user", "assistant") * 3] + [msg("user", "q")]
    # the fake's prompt is the contents' bytes: 10 + 6 x 30 + 1 = 191 tokens
    with pytest.raises(ContextOverflowError, match=r"191 tokens .* let the oldest messages be left out"):
        run(e, ensemble="e", messages=turns, n_ctx=100)
    _, done = run(e, ensemble="e", messages=turns, n_ctx=100, truncate=True,
                  params=SamplingParams(seed=1, max_tokens=5))
    # room for the answer (5 tokens): 100 - 5 = 95 -> two turns go (4 messages), 71 tokens stay
    assert done.stats.dropped_messages == 4 and done.stats.members[0].dropped_messages == 4
    assert done.stats.prompt_tokens == 10 + 2 * 30 + 1 and done.finish_reason == "length"
    # the latest message alone does not fit: refused, never cut
    with pytest.raises(ContextOverflowError, match=r"the prompt is 120 tokens \(leaving out the 6 oldest messages\)"):
        run(e, ensemble="e", messages=turns[:-1] + [msg("user", "q" * 110)], n_ctx=100, truncate=True)


def test_a_free_slot_large_enough_is_preferred_to_growing_another():
    e, factory = engine()
    loaded = e.ensemble("duo")
    # two slots: the first grown by a large request, then a small request takes the other one
    t1, t2 = loaded.admit(), loaded.admit()
    s1 = loaded.acquire(t1, [[1], [1]], contexts=[100, 100])
    s2 = loaded.acquire(t2, [[1], [1]], contexts=[32, 32])
    s1.fit([100, 100])
    loaded.leave(t1)
    loaded.leave(t2)
    assert s1 is not s2 and [m.n_ctx for m in s1.members] == [100, 100] and [m.n_ctx for m in s2.members] == [32, 32]
    t3 = loaded.admit()
    assert loaded.acquire(t3, [[5], [5]], contexts=[80, 80]) is s1  # no cached prefix either way: the large one
    loaded.leave(t3)
    assert factory.resized == [("one", 100), ("two", 100)]


# --------------------------------------------------------------------------- a llama.cpp member's new context


@pytest.fixture(scope="module")
def tiny_model(tiny_models):
    model = LoadedModel(tiny_models["a1"])
    yield model
    model.close()


def test_a_member_resizes_its_context_within_the_systems_memory(tiny_model, monkeypatch):
    member = LlamaMember("one", tiny_model, ContextSettings(n_ctx=64, n_threads=1))
    try:
        per_cell = member.memory_bytes / 256  # llama.cpp gives at least 256 cells
        assert per_cell == 2 * 2 * (16 + 16) * 2  # layers x KV heads x (K + V head size) x f16
        member.evaluate([1, 2, 3])
        member.resize(1000)
        assert (member.n_ctx, list(member.cached), member.memory_bytes) == (1000, [], 1024 * per_cell)
        member.evaluate([1 + i % 50 for i in range(899)])
        monkeypatch.setattr(llama_context, "available_memory", lambda: 1 << 10)
        with pytest.raises(ModelLoadError, match=r"a context of 100000 tokens for member 'one' needs \d+ MiB more "
                                                 "memory for its KV cache, and the system has 0 MiB available; ask "
                                                 r"for a smaller context \(num_ctx\)"):
            member.resize(100_000)
        assert member.n_ctx == 1000 and len(member.cached) == 899  # untouched: it goes on serving
        member.evaluate([5])
    finally:
        member.close()


# --------------------------------------------------------------------------- the Ollama route, tiny models

SERVER_CONFIG = """
ensembles:
  long:
    n_ctx: 256
    members:
      - {{name: one, path: {long}, n_threads: 1}}
  tiny:
    n_ctx: 256
    sampling: {{max_tokens: 8}}
    members:
      - {{name: one, path: {a1}, n_threads: 1}}
      - {{name: two, path: {a2}, n_threads: 1}}
"""


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny model trained (as its GGUF says) for 32768 tokens."""
    maker = _load_script("make_tiny_models")
    return maker.build_tiny_model(tmp_path_factory.mktemp("long") / "tiny-long.gguf", 5, n_ctx_train=32768)


@pytest.fixture
async def server(aiohttp_client, tmp_path, tiny_models, long_model):
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(SERVER_CONFIG.format(long=long_model, **tiny_models)))
    state = ServerState(engine_loader(path))
    client = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    return client, state


WORDS = " ".join(f"w{i % 97}" for i in range(2000))


async def test_a_long_prompt_with_cline_s_num_ctx_runs_in_a_grown_context(server):
    client, state = server
    messages = [msg("system", "You are a coding agent."), msg("user", WORDS)]
    n_prompt = len(state.engine.ensemble("long").members[0].chat_prompt(messages))
    assert 2000 < n_prompt < 32768 - 8  # far beyond the ensemble's n_ctx of 256
    body = {"model": "long", "messages": messages, "options": {"num_ctx": 32768, "num_predict": 3, "seed": 1}}
    lines = ndjson_lines(await (await client.post("/api/chat", json=body)).read())
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length" and final["prompt_eval_count"] == n_prompt
    assert final["me_local"]["members"][0]["n_ctx"] == 32768 and "dropped_messages" not in final["me_local"]
    ps = {m["name"]: m for m in (await (await client.get("/api/ps")).json())["models"]}
    assert ps["long:latest"]["context_length"] == 32768
    assert ps["long:latest"]["size"] >= 32768 * 256  # its KV cache now: 256 bytes a cell
    # the same without num_ctx: refused, naming the fixes
    body["options"] = {"num_predict": 3}
    resp = await client.post("/api/chat", json=body)
    assert resp.status == 400
    assert "has a context of 256 tokens; shorten the prompt or raise n_ctx" in (await resp.json())["error"]


async def test_a_conversation_beyond_a_members_trained_context_drops_its_oldest_turns(server):
    client, state = server
    turns = [msg("system", "Be brief.")]
    for i in range(12):
        turns += [msg("user", f"question {i}: " + WORDS[:800]), msg("assistant", f"answer {i}: " + WORDS[:800])]
    turns.append(msg("user", "And the last question?"))
    member = state.engine.ensemble("tiny").members[0]
    assert len(member.chat_prompt(turns)) > 2048  # beyond the tiny models' trained context
    body = {"model": "tiny", "messages": turns, "stream": False, "options": {"num_ctx": 32768, "num_predict": 4}}
    out = await (await client.post("/api/chat", json=body)).json()
    ext = out["me_local"]
    dropped = ext["dropped_messages"]
    assert dropped % 2 == 0 and 0 < dropped < len(turns) - 2  # whole turns, the oldest ones
    assert [m["n_ctx"] for m in ext["members"]] == [2048, 2048]  # at most the trained context
    kept = [turns[0], *turns[1 + dropped:]]
    assert out["prompt_eval_count"] == len(member.chat_prompt(kept)) <= 2048 - 4
    assert len(member.chat_prompt([turns[0], *turns[dropped - 1:]])) > 2048 - 4  # one turn more would not fit
    assert out["done"] is True and 1 <= out["eval_count"] <= 4
    # truncate: false refuses it, naming the fix
    resp = await client.post("/api/chat", json=dict(body, truncate=False))
    assert resp.status == 400 and "let the oldest messages be left out (truncate)" in (await resp.json())["error"]
    # a latest message that alone does not fit is refused, never cut
    resp = await client.post("/api/chat", json=dict(body, messages=[turns[0], msg("user", WORDS * 3)]))
    assert resp.status == 400 and "has a context of 2048 tokens for this request" in (await resp.json())["error"]


async def test_num_ctx_beyond_max_ctx_is_a_400_naming_it(server):
    client, _ = server
    body = {"model": "tiny", "prompt": "Hi", "options": {"num_ctx": 32769}}
    resp = await client.post("/api/generate", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"] == ("`options.num_ctx` is 32769 but ensemble 'tiny' allows contexts of at "
                                            "most 32768 tokens (`max_ctx` in models.yaml); send at most that, or "
                                            "raise `max_ctx`")


# --------------------------------------------------------------------------- editors' requests, shipped ensembles

CODE = "\n".join(f"def area_{i}(width, height):\n    return width * height * {i}\n" for i in range(98))
EDITOR_TURNS = [
    msg("system", "You are a coding assistant. Answer with code only."),
    msg("user", f"Here is my file:\n```python\n{CODE}```\nWhat does area_3 return?"),
    msg("assistant", "It returns width * height * 3."),
    msg("user", "Rename it to area_three."),
]


@pytest.fixture(scope="module")
def shipped_engine(tmp_path_factory, smollm_path, gemma_path):
    """The packaged models.yaml with its pkg:// paths made absolute (Gemma assembled in a test cache)."""
    import yaml

    from me_local.config import load_config, packaged_config_path

    raw = yaml.safe_load(packaged_config_path().read_text())
    for ens in raw["ensembles"].values():
        for m in ens["members"]:
            m["path"] = str(gemma_path if "gemma" in m["path"] else smollm_path)
            m["n_threads"] = 1  # kinder to a loaded 2-core machine (ggml's threads spin)
    path = tmp_path_factory.mktemp("shipped") / "models.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    engine = Engine(load_config(path))
    yield engine
    engine.close()


@pytest.mark.smollm
@pytest.mark.parametrize("ensemble", ["default", "smollm-duo", "smollm", "gemma"])
def test_cline_aider_and_zed_shaped_requests_run_on_the_shipped_ensembles(shipped_engine, ensemble):
    """Cline asks for 32768 tokens, aider for its prompt's tokens x 1.25 + 8192, Zed for 4096, with a
    prompt beyond 2048 tokens, the n_ctx of the shipped two-member ensembles (before num_ctx was
    honoured: a 400). Each member gets the context asked for, at most its trained one."""
    loaded = shipped_engine.ensemble(ensemble)
    sizes = {m.name: len(m.chat_prompt(EDITOR_TURNS)) for m in loaded.members}
    trained = {m.name: m.model.n_ctx_train for m in loaded.members}
    assert trained == {m.name: 8192 if m.model.path.name.startswith("SmolLM2") else 32768 for m in loaded.members}
    assert min(sizes.values()) > 2048
    aider = int(max(sizes.values()) * 1.25) + 8192
    for num_ctx in (32768, aider, 4096):
        _, done = collect(shipped_engine.generate(Request(
            ensemble=ensemble, messages=EDITOR_TURNS, n_ctx=num_ctx, truncate=True,
            params=SamplingParams(seed=3, max_tokens=8))))
        assert done.finish_reason in ("length", "stop") and done.stats.dropped_messages is None
        assert done.stats.prompt_tokens == max(sizes.values())
        got = {m.name: m.n_ctx for m in done.stats.members}
        assert got == {name: min(num_ctx, trained[name]) for name in sizes}, (num_ctx, got)
        if num_ctx == 32768:  # every member ran: its whole prompt in its grown context
            assert all(m.prompt_tokens == sizes[m.name] for m in done.stats.members), done.stats.members
