"""The command line on real tiny models: generate (text, --json, --show-members,
--stats), models, and chat driven through its prompt."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from me_local.backends.llama import ContextSettings, LlamaMember, LoadedModel
from me_local.cli import cli
from me_local.core.sampling import log_softmax, mixture, softmax

T1 = ["--temperature", "1", "--top-k", "0", "--top-p", "1", "--min-p", "0"]


def invoke(args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


def test_generate_streams_text_reproducibly(tiny_config):
    args = ["generate", "--config", str(tiny_config), "-e", "tiny", "--raw", "-n", "20", "--seed", "4", *T1, "Hello"]
    a, b = invoke(args), invoke(args)
    assert a.exit_code == 0 and a.stdout == b.stdout
    assert len(a.stdout.strip()) > 0
    c = invoke([*args[:-4], "--seed", "5", *T1, "Hello"])
    assert c.stdout != a.stdout


def test_generate_json_lines_carry_ids_members_and_true_logprobs(tiny_config, tiny_models):
    result = invoke(["generate", "--config", str(tiny_config), "-e", "pair", "--raw", "--json", "-n", "6",
                     "--seed", "9", *T1, "Hello world"])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    *tokens, final = lines
    assert final["done"] is True and final["finish_reason"] == "length"
    assert final["stats"]["generated_tokens"] == 6
    assert {m["name"] for m in final["stats"]["members"]} == {"one", "two"}
    assert len(tokens) == 6
    assert all(set(t) == {"id", "text", "member", "logprob"} for t in tokens)
    # the logprob is the named member's log-softmax at that position, recomputed from scratch
    models = {"one": LoadedModel(tiny_models["a1"]), "two": LoadedModel(tiny_models["a2"])}
    prompt = models["one"].tokenize("Hello world", add_special=True)
    for i, t in enumerate(tokens):
        m = LlamaMember("check", models[t["member"]], ContextSettings(n_ctx=64))
        m.evaluate(prompt + [x["id"] for x in tokens[:i]])
        assert t["logprob"] == pytest.approx(float(log_softmax(m.logits())[t["id"]]), abs=1e-3)
        m.close()
    # ce: the log of the mixture probability
    result = invoke(["generate", "--config", str(tiny_config), "-e", "pair", "--raw", "--json", "-n", "1",
                     "--mode", "ce", "--seed", "1", *T1, "Hello world"])
    first = json.loads(result.stdout.splitlines()[0])
    assert first["member"] is None
    rows = []
    for model in models.values():
        m = LlamaMember("check", model, ContextSettings(n_ctx=64))
        m.evaluate(prompt)
        rows.append(softmax(m.logits()))
        m.close()
    assert first["logprob"] == pytest.approx(float(np.log(mixture(rows, [0.5, 0.5])[first["id"]])), abs=1e-4)


def test_show_members_colours_tokens_and_prints_a_legend(tiny_config):
    result = invoke(["generate", "--config", str(tiny_config), "-e", "pair", "--raw", "-n", "12", "--seed", "3",
                     "--show-members", "Hello"], color=True)
    assert "\x1b[36m" in result.stdout or "\x1b[35m" in result.stdout  # cyan = one, magenta = two
    assert "■ one" in result.stderr and "■ two" in result.stderr
    plain = invoke(["generate", "--config", str(tiny_config), "-e", "pair", "--raw", "-n", "12", "--seed", "3",
                    "Hello"])
    assert "\x1b[" not in plain.stdout


def test_stats_report_members_and_speed(tiny_config):
    result = invoke(["generate", "--config", str(tiny_config), "-e", "tiny", "--raw", "-n", "10", "--seed", "1",
                     "--stats", "Hello"])
    err = result.stderr
    assert "mode me  seed 1  finish length" in err
    assert "generated 10 tokens" in err and "time to first token" in err and "tokens/s" in err
    for name in ("one", "two", "three"):
        assert name in err and "catch-up" in err


def test_models_lists_members_sharing_and_problems(tiny_config, write_config, tiny_models):
    result = invoke(["models", "--config", str(tiny_config)])
    assert result.exit_code == 0
    assert "tiny  (mode me, n_ctx 256, parallel 1)" in result.stdout
    assert "vocab 527" in result.stdout and "tiny-a-2.gguf" in result.stdout
    twins = write_config(f"""
        ensembles:
          twins:
            members:
              - {{name: x, path: {tiny_models['a1']}}}
              - {{name: y, path: {tiny_models['a1']}}}
          broken:
            granularity: token
            members:
              - {{name: p, path: {tiny_models['a1']}}}
              - {{name: q, path: {tiny_models['b1']}}}
              - {{name: r, path: missing.gguf}}
        """, name="twins.yaml")
    result = invoke(["models", "--config", str(twins)])
    assert result.exit_code == 2
    assert "shares weights with x" in result.stdout
    assert "members 'p' and 'q' do not share a vocabulary" in result.stdout
    assert "missing.gguf" in result.stdout and "does not exist" in result.stdout


def test_chat_through_its_prompt(tiny_config):
    session = "\n".join([
        "/set seed 3",
        "/set temperature 0",
        "Hello world",
        "/stats",
        '"""',
        "line one",
        "line two",
        '"""',
        "/set mode ce",
        "/set weights one=1,zz=1",
        "/set top_p 7",
        "/clear",
        "/bogus",
        "/bye",
        "never read",
    ]) + "\n"
    result = invoke(["chat", "--config", str(tiny_config), "-e", "pair", "-n", "8"], input=session)
    out = result.stdout
    assert result.exit_code == 0
    assert "me-local chat on ensemble pair (mode me: one 0.50, two 0.50)" in out
    assert "Set seed to 3." in out and "Set temperature to 0." in out
    assert "generated 8 tokens" in out and "selected" in out
    assert "Set mode to ce." in out
    assert "error: no member 'zz'" in out
    assert "error: top_p must be between 0 and 1" in out
    assert "Conversation cleared." in out
    assert "Unknown command /bogus" in out
    assert "never read" not in out


def test_chat_greedy_answers_match_generate(tiny_config):
    """The chat streams what generate produces for the same conversation and settings."""
    gen = invoke(["generate", "--config", str(tiny_config), "-e", "pair", "-n", "8", "--temperature", "0",
                  "--seed", "1", "Hello world"])
    chat = invoke(["chat", "--config", str(tiny_config), "-e", "pair", "-n", "8", "--temperature", "0",
                   "--seed", "1"], input="Hello world\n/bye\n")
    assert gen.stdout.strip() and gen.stdout.strip() in chat.stdout


def _read_until(fd, needle: bytes | Callable[[bytes], bool], timeout: float = 60.0) -> bytes:
    """Read the terminal until ``needle`` appears in what was read (or ``needle(read)`` holds)."""
    buf = b""
    deadline = time.monotonic() + timeout
    done = needle if callable(needle) else (lambda b: needle in b)
    while not done(buf):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"did not see {needle!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


@pytest.mark.smollm
def test_chat_on_a_terminal_ctrl_c_stops_the_answer_and_keeps_the_session(smollm_path, write_config, tmp_path):
    cfg = write_config(f"""
        ensembles:
          default:
            n_ctx: 4096
            members:
              - {{name: a, path: {smollm_path}, weight: 1}}
              - {{name: b, path: {smollm_path}, weight: 1}}
        """)
    pid, fd = pty.fork()
    if pid == 0:  # child: the real console script on a real terminal
        os.environ["ME_LOCAL_HOME"] = str(tmp_path)
        os.execv(sys.executable, [sys.executable, "-m", "me_local.cli", "chat", "--config", str(cfg),
                                  "-n", "100000", "--temperature", "1.5", "--top-k", "0", "--top-p", "1",
                                  "--min-p", "0", "--seed", "1"])
    try:
        _read_until(fd, b">>> ")
        os.write(fd, b"Tell me a very long story\r")
        echoed = _read_until(fd, b"story")

        def answering(buf: bytes) -> bool:  # the echoed line ended and the answer's first words arrived
            # readline's own control sequences (bracketed paste off: ESC [?2004l) come before the answer
            after = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", (echoed + buf).split(b"story", 1)[1])
            return b"\n" in after and len(after.split(b"\n", 1)[1].strip()) >= 8

        _read_until(fd, answering)  # it streams now: its 4096 tokens take tens of seconds
        os.write(fd, b"\x03")
        out = _read_until(fd, b">>> ")
        assert b"[stopped]" in out
        os.write(fd, b"/stats\r")
        out = _read_until(fd, b">>> ")
        assert b"finish cancelled" in out
        os.write(fd, b"/bye\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (tmp_path / "chat_history").read_text().strip().endswith("/bye")
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.smollm
def test_default_ensemble_end_to_end(tmp_path, monkeypatch):
    """The shipped models.yaml and its models (SmolLM2 in a wheel, Gemma 3 assembled from chunk packages
    into this HOME's cache), from any directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ME_LOCAL_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    exe = os.path.join(os.path.dirname(sys.executable), "me-local")
    proc = subprocess.run([exe, "generate", "--temperature", "0", "--mode", "single", "-n", "24",
                           "What is the capital of France?"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    # two model families, word by word: SmolLM2 (byte-level BPE) and Gemma 3 (SentencePiece)
    proc = subprocess.run([exe, "generate", "--json", "--seed", "1", "-n", "40", "Give me three tips for sleeping "
                           "better."], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["stats"]["granularity"] == "word"
    assert {t["member"] for t in lines[:-1] if t["id"] is not None} == {"smollm", "gemma"}
    assert [m["name"] for m in lines[-1]["stats"]["members"]] == ["smollm", "gemma"]


class _Interrupted:
    """Events that raise Ctrl+C twice (once mid-answer, once while draining) before the DoneEvent."""

    def __init__(self) -> None:
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        from me_local.core import DoneEvent, GenerationStats, TokenEvent

        self.n += 1
        if self.n == 1:
            return TokenEvent(0, 5, "Hel", "a")
        if self.n in (2, 3):
            raise KeyboardInterrupt
        if self.n == 4:
            return DoneEvent("cancelled", GenerationStats("me", 0))
        raise StopIteration


class _Backend:
    def __init__(self, events_factory) -> None:
        self.events_factory = events_factory
        self.cancelled = 0

    def stream(self, messages, settings, stop):
        stop.append(self._cancel)
        return self.events_factory()

    def _cancel(self):
        self.cancelled += 1


def test_a_second_ctrl_c_while_stopping_keeps_the_session_and_its_conversation(capsys):
    from me_local.cli.chat import ChatSession

    backend = _Backend(_Interrupted)
    session = ChatSession(backend, {})
    session.answer("hi")
    assert backend.cancelled == 1
    assert session.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert session.last is not None and session.last.finish_reason == "cancelled"
    assert "[stopped]" in capsys.readouterr().out


def test_an_unexpected_failure_is_reported_and_the_conversation_kept(capsys):
    from me_local.cli.chat import ChatSession

    def boom():
        raise RuntimeError("the worker died")

    session = ChatSession(_Backend(boom), {})
    session.messages = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "answer"}]
    session.answer("hi")
    assert "error: the worker died" in capsys.readouterr().out
    assert session.messages == [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "answer"}]


def test_nan_and_infinite_sampling_values_are_refused(tiny_config):
    for flag in ("--temperature", "--top-p", "--min-p"):
        result = CliRunner().invoke(cli, ["generate", "--config", str(tiny_config), flag, "nan", "hi"])
        assert result.exit_code == 2 and "is not a finite number" in result.output
    result = CliRunner().invoke(cli, ["generate", "--config", str(tiny_config), "-t", "inf", "hi"])
    assert result.exit_code == 2
    out = invoke(["chat", "--config", str(tiny_config), "-e", "pair"],
                 input="/set temperature nan\n/set top_p inf\n/bye\n").stdout
    assert "error: temperature needs a finite number, got 'nan'" in out
    assert "error: top_p needs a finite number, got 'inf'" in out


def test_python_dash_m_me_local_is_the_command():
    out = subprocess.run([sys.executable, "-m", "me_local", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "me-local" in out.stdout
