"""The shipped two-family default ensemble (SmolLM2-135M-Instruct + Gemma 3 270M, word by word)
end to end: a real server with the official ``openai`` and ``ollama`` clients, and chat."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest
import yaml
from click.testing import CliRunner

from me_local.cli import cli
from me_local.config import packaged_config_path
from me_local.server import ServerSettings

from .server_helpers import LiveServer, engine_loader

pytestmark = pytest.mark.smollm

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, smollm_path, gemma_path):
    """The packaged models.yaml with its pkg:// paths made absolute (Gemma assembled in a test cache)."""
    raw = yaml.safe_load(packaged_config_path().read_text())
    for ens in raw["ensembles"].values():
        for m in ens["members"]:
            m["path"] = str(gemma_path if "gemma" in m["path"] else smollm_path)
    path = tmp_path_factory.mktemp("shipped") / "models.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def live(shipped):
    server = LiveServer(ServerSettings(port=0), engine_loader(shipped)).start()
    yield server
    server.stop()


def test_openai_chat_on_the_two_family_default(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0) as oa:
        assert oa.models.retrieve("default").model_extra["me_local"]["granularity"] == "word"
        for seed in (1, 2, 3):
            full = oa.chat.completions.create(model="default", messages=FRANCE, temperature=0, seed=seed,
                                              max_tokens=40, logprobs=True)
            text = full.choices[0].message.content
            assert "Paris" in text, text
            members = [c.model_extra["member"] for c in full.choices[0].logprobs.content]
            assert set(members) <= {"smollm", "gemma"}
            assert full.usage.model_extra["me_local"]["granularity"] == "word"
        # a longer answer: both families write words of it, streamed as they come
        kw = dict(model="default", messages=[{"role": "user", "content": "Give me three tips for sleeping better."}],
                  seed=2, max_tokens=60, logprobs=True)
        full = oa.chat.completions.create(**kw)
        members = [c.model_extra["member"] for c in full.choices[0].logprobs.content]
        assert set(members) == {"smollm", "gemma"}
        chunks = list(oa.chat.completions.create(**kw, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
        assert "\nUser:" not in full.choices[0].message.content  # the base model's next turn is cut


def test_ollama_chat_and_generate_on_the_two_family_default(live):
    ol = ollama.Client(host=live.url)
    info = ol.show("default").modelinfo
    assert info["me-local.granularity"] == "word" and info["me-local.shared_vocabulary"] is False
    reply = ol.chat(model="default:latest", messages=FRANCE, options={"temperature": 0, "seed": 4, "num_predict": 40})
    assert "Paris" in reply.message.content and reply.done
    parts = list(ol.chat(model="default", messages=FRANCE, stream=True,
                         options={"temperature": 0, "seed": 4, "num_predict": 40}))
    assert "".join(p.message.content for p in parts) == reply.message.content
    body = httpx.post(live.url + "/api/chat", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "Tell me about the moon."}], "stream": False,
        "logprobs": True, "options": {"seed": 3, "num_predict": 60}}).json()
    assert {lp["member"] for lp in body["logprobs"]} == {"smollm", "gemma"}


def test_chat_on_the_two_family_default(shipped):
    session = "/set seed 1\n/set temperature 0\nWhat is the capital of France?\n/stats\n/bye\n"
    result = CliRunner().invoke(cli, ["chat", "--config", str(shipped), "-n", "40"], input=session,
                                catch_exceptions=False)
    assert result.exit_code == 0
    assert "ensemble default (mode me: smollm 0.60, gemma 0.40)" in result.stdout
    assert "Paris" in result.stdout and "granularity word" in result.stdout
