"""Per-member chat templates: `chat_template:` in models.yaml (a built-in's name or Jinja text)
used instead of the file's; checked when the config is read; each member gets the prompt of its
own template; `me-local models` and /api/show say which template each member uses and why."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from me_local import chat_templates
from me_local import settings as S
from me_local.backends.llama import LoadedModel, LoadSettings
from me_local.cli import cli
from me_local.config import load_config, parse_config
from me_local.core import SamplingParams
from me_local.engine import Engine, Request, collect
from me_local.errors import RequestError
from me_local.server import ServerState, create_app

from .server_helpers import fake_engine_loader

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
BUILTIN_NAMES = "chatml, gemma, llama3, plain, zephyr"
CUSTOM = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


def vocab_only(path: Path) -> LoadedModel:
    return LoadedModel(path, LoadSettings(repack=False), vocab_only=True)


def as_text(model: LoadedModel, tokens: list[int]) -> list[bytes]:
    return [model.token_texts[t] for t in tokens]


# --------------------------------------------------------------------------- the table and the docs


def test_the_builtins_table_is_what_the_docs_and_the_setting_list():
    assert list(chat_templates.BUILTINS) == ["chatml", "gemma", "llama3", "plain", "zephyr"]
    rows = re.findall(r"^  \| `(\w+)` \| (.*) \|$", README, flags=re.M)
    assert rows == [(t.name, t.description.replace("|", "\\|")) for t in chat_templates.BUILTINS.values()]
    assert f"({BUILTIN_NAMES})" in S.CHAT_TEMPLATE.help
    assert chat_templates.DEFAULT.name == "chatml"
    for t in chat_templates.BUILTINS.values():  # each one compiles as the formatter compiles it
        assert chat_templates.problem(t.name) is None and chat_templates.problem(t.text) is None


def test_the_default_is_still_chatml_for_a_file_without_one(tiny_models):
    model = vocab_only(tiny_models["a4_nochat"])
    try:
        t = model.template()
        assert t.source == "default chatml (the file has none)"
        assert model.format_chat(CAPITAL) == (
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    finally:
        model.close()


# --------------------------------------------------------------------------- real prompts


def test_gemma_gets_its_own_turns_with_chat_template_gemma_and_chatml_without(gemma_path):
    gemma = vocab_only(gemma_path)
    try:
        assert gemma.chat_template is None  # the file carries none
        msgs = [{"role": "system", "content": "Answer briefly."}, *CAPITAL]
        tokens = gemma.chat_tokens(msgs, template=gemma.template("gemma"))
        expected = ("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n"
                    "<start_of_turn>model\n")
        assert gemma.format_chat(msgs, gemma.template("gemma")) == expected
        assert tokens == gemma.tokenize(expected, add_special=False, parse_special=True)
        assert as_text(gemma, tokens)[:4] == [b"<bos>", b"<start_of_turn>", b"user", b"\n"]  # one BOS, real markup
        assert as_text(gemma, tokens)[-4:] == [b"\n", b"<start_of_turn>", b"model", b"\n"]
        assert tokens.count(gemma.bos) == 1
        # a later turn: assistant is `model`, every turn ends with <end_of_turn>
        turns = [*msgs, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
        assert gemma.format_chat(turns, gemma.template("gemma")) == (
            "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n"
            "<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\nAnd Spain?<end_of_turn>\n"
            "<start_of_turn>model\n")
        # without it, the file's missing template falls back to ChatML, text Gemma was never trained on
        plain = gemma.chat_tokens(CAPITAL)
        assert plain == gemma.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                       "<|im_start|>assistant\n", add_special=True)
        assert b"<start_of_turn>" not in as_text(gemma, plain)
        with pytest.raises(RequestError) as err:  # Gemma's own rule: roles alternate
            gemma.chat_tokens([*CAPITAL, *CAPITAL], template=gemma.template("gemma"))
        assert str(err.value) == (
            "the chat template used for gemma-3-270m-q4_k_m.gguf (built-in gemma (models.yaml)) rejected these "
            "messages (Conversation roles must alternate user/assistant/user/assistant/...); "
            "check the roles and their order")
    finally:
        gemma.close()


def test_members_on_one_file_get_the_prompts_of_their_own_templates(smollm_path, write_config):
    cfg = write_config(f"""
        ensembles:
          e:
            n_ctx: 256
            members:
              - {{name: own, path: {smollm_path}, n_threads: 1}}
              - {{name: gemma, path: {smollm_path}, n_threads: 1, chat_template: gemma}}
              - {{name: chatml, path: {smollm_path}, n_threads: 1, chat_template: chatml}}
              - name: custom
                path: {smollm_path}
                n_threads: 1
                chat_template: {json.dumps(CUSTOM)}
        """)
    engine = Engine(load_config(cfg))
    try:
        loaded, _, _, _, prompts = engine.plan(Request(ensemble="e", messages=CAPITAL))
        model = loaded.members[0].model
        assert all(m.model is model for m in loaded.members)  # one file, one load

        def tokens(text: str) -> list[int]:
            return model.tokenize(text, add_special=model.add_bos)

        q = "What is the capital of France?"
        assert prompts == [
            # SmolLM2's own template adds its default system prompt
            tokens("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   f"<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
            # {{ bos_token }} is SmolLM2's BOS, <|im_start|>; Gemma's markup is plain text to this vocabulary
            tokens(f"<|im_start|><start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"),
            tokens(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
            tokens(f"[user] {q}\n[assistant] "),
        ]
        assert [m.template.source for m in loaded.members] == [
            "file", "built-in gemma (models.yaml)", "built-in chatml (models.yaml)", "models.yaml"]
    finally:
        engine.close()


# --------------------------------------------------------------------------- errors


BAD = [
    ("unknown name", "gema",
     f"unknown built-in chat template 'gema'; name one of {BUILTIN_NAMES}, or give a Jinja template"),
    ("Jinja syntax", "{% for m in messages %}{{ m['content'] }}",
     "is not a valid Jinja template (line 1: Unexpected end of template. Jinja was looking for the following "
     "tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for'.); fix it, or name a "
     f"built-in: {BUILTIN_NAMES}"),
    ("unknown filter", "{{ messages | shout }}",
     f"is not a valid Jinja template (line 1: No filter named 'shout'.); fix it, or name a built-in: {BUILTIN_NAMES}"),
    ("no markup", "User: and so on",
     f"is neither a built-in's name ({BUILTIN_NAMES}) nor a Jinja template (it has no {{{{ }}}} or {{% %}}); "
     "give one of them"),
    ("not text", 3, f"must be a built-in's name ({BUILTIN_NAMES}) or a Jinja template, got 3"),
]


@pytest.mark.parametrize("case,value,reason", BAD, ids=[b[0] for b in BAD])
def test_a_bad_chat_template_is_one_line_naming_the_member_and_the_builtins(write_config, tiny_models, case, value,
                                                                             reason):
    cfg = write_config(textwrap.dedent(f"""
        ensembles:
          e:
            members:
              - {{name: ok, path: {tiny_models['a1']}}}
              - {{name: bad, path: {tiny_models['a1']}, chat_template: {json.dumps(value)}}}
        """))
    result = CliRunner().invoke(cli, ["generate", "--config", str(cfg), "-n", "1", "hi"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.strip() == f"me-local: error: {cfg}: ensembles.e.members[1].chat_template: {reason}"


def test_a_valid_jinja_template_and_a_padded_name_are_accepted(tiny_models):
    cfg = parse_config(textwrap.dedent(f"""
        ensembles:
          e:
            members:
              - {{name: a, path: {tiny_models['a1']}, chat_template: " gemma "}}
              - name: b
                path: {tiny_models['a1']}
                chat_template: |
                  {{% for m in messages %}}{{% generation %}}{{{{ m['content'] }}}}{{% endgeneration %}}{{% endfor %}}
        """), Path("/x/models.yaml"))
    a, b = cfg.get("e").members
    assert chat_templates.choose(a.chat_template, None).source == "built-in gemma (models.yaml)"
    assert chat_templates.choose(b.chat_template, "file's").source == "models.yaml"


# --------------------------------------------------------------------------- reports


REPORT_CONFIG = """
    ensembles:
      e:
        members:
          - {{name: own, path: {a1}}}
          - {{name: nochat, path: {nochat}}}
          - {{name: named, path: {nochat}, chat_template: gemma}}
          - name: custom
            path: {a1}
            chat_template: {custom}
    """

SOURCES = {"own": "file", "nochat": "default chatml (the file has none)", "named": "built-in gemma (models.yaml)",
           "custom": "models.yaml"}


def report_config(write_config, tiny_models) -> Path:
    return write_config(REPORT_CONFIG.format(a1=tiny_models["a1"], nochat=tiny_models["a4_nochat"],
                                             custom=json.dumps(CUSTOM)))


def test_me_local_models_says_which_template_each_member_uses(write_config, tiny_models):
    result = CliRunner().invoke(cli, ["models", "--config", str(report_config(write_config, tiny_models))])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name, source in SOURCES.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {name} "))
        assert lines[at + 1] == f"  {'':<14} chat template: {source}"


def test_me_local_models_on_gemma_with_and_without_chat_template_gemma(gemma_path, write_config):
    cfg = write_config(f"""
        ensembles:
          g:
            members:
              - {{name: bare, path: {gemma_path}}}
              - {{name: turns, path: {gemma_path}, chat_template: gemma}}
        """)
    result = CliRunner().invoke(cli, ["models", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "chat template: default chatml (the file has none)\n  turns " in result.stdout
    assert result.stdout.rstrip().endswith("chat template: built-in gemma (models.yaml)\n"
                                           "  granularity token: the members share a vocabulary\n  ok")


async def test_api_show_reports_each_members_template_and_its_source(aiohttp_client, write_config, tiny_models):
    state = ServerState(fake_engine_loader(report_config(write_config, tiny_models)))
    client = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    show = await (await client.post("/api/show", json={"model": "e"})).json()
    assert show["template"] == ""  # Ollama's field is a Go template: none to give
    assert show["model_info"]["me-local.members"] == list(SOURCES)
    templates = show["model_info"]["me-local.chat_templates"]
    assert {name: t["source"] for name, t in templates.items()} == SOURCES
    assert templates["custom"]["template"] == CUSTOM
    assert templates["named"]["template"] == chat_templates.BUILTINS["gemma"].text
    assert templates["nochat"]["template"] == chat_templates.DEFAULT.text
    assert templates["own"]["template"].startswith("{% for message in messages %}")  # the tiny file's ChatML
    assert "# member named weight 1.0 path " in show["modelfile"]
    assert show["modelfile"].splitlines()[3].endswith("chat template built-in gemma (models.yaml)")
    one = await (await client.post("/api/show", json={"model": "e/named"})).json()
    assert list(one["model_info"]["me-local.chat_templates"]) == ["named"]


# --------------------------------------------------------------------------- plain, for base models


EXAMPLE = ("The following is a conversation between a user and a helpful assistant.\n\n"
           "User: What is the boiling point of water at sea level?\n"
           "Assistant: Water boils at 100 °C (212 °F) at sea level.")


def test_plain_renders_turns_as_text(tiny_models):
    model = vocab_only(tiny_models["a1"])
    try:
        turns = [{"role": "system", "content": EXAMPLE}, *CAPITAL, {"role": "assistant", "content": " Paris. "},
                 {"role": "user", "content": "And Spain?"}]
        assert model.format_chat(turns, model.template("plain")) == (
            f"{EXAMPLE}\n\nUser: What is the capital of France?\nAssistant: Paris.\n\nUser: And Spain?\nAssistant:")
    finally:
        model.close()


def test_gemma_base_answers_in_plain_with_an_example_and_stops_at_the_next_turn(gemma_path, write_config):
    cfg = write_config(f"""
        ensembles:
          g:
            n_ctx: 256
            members:
              - {{name: gemma, path: {gemma_path}, chat_template: plain, system: {json.dumps(EXAMPLE)}}}
        """)
    engine = Engine(load_config(cfg))
    try:
        loaded, _, _, _, (prompt,) = engine.plan(Request(ensemble="g", messages=CAPITAL))
        model = loaded.members[0].model
        assert prompt == model.tokenize(f"{EXAMPLE}\n\nUser: What is the capital of France?\nAssistant:",
                                        add_special=True)
        params = SamplingParams(temperature=0, max_tokens=32, stop=("\nUser:",))
        text, done = collect(engine.generate(Request(ensemble="g", messages=CAPITAL, params=params)))
        assert text.strip() == "Paris." and done.finish_reason == "stop"
    finally:
        engine.close()
