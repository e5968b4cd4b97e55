"""Chat templates: the built-ins a member can name in models.yaml, and which template a
member uses and where it came from.

A member's chat template is, in this order: its models.yaml ``chat_template`` (the name of
a built-in below, or Jinja text), else the one its GGUF file carries
(``tokenizer.chat_template``), else ChatML (:data:`DEFAULT`). The templates are rendered
by llama-cpp-python's Jinja formatter (``bos_token``, ``eos_token``, ``messages``,
``add_generation_prompt``, ``raise_exception``); :func:`problem` checks a models.yaml value
when the config is read.

Pure: the standard library only (jinja2, a dependency of llama-cpp-python, is imported
by :func:`problem` when a member gives Jinja text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    text: str


BUILTINS: dict[str, Builtin] = {t.name: t for t in (
    Builtin(
        "chatml",
        "ChatML, `<|im_start|>role` ... `<|im_end|>` (SmolLM2, Qwen); the default for files without one",
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ),
    Builtin(
        "gemma",
        "Gemma 3, `<start_of_turn>user` / `<start_of_turn>model` ... `<end_of_turn>` after BOS; the system "
        "prompt opens the first user turn; roles must alternate",
        # Gemma 3's own template (google/gemma-3-*-it) for text messages
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}"
        "{% set first_user_prefix = '' %}"
        "{% set loop_messages = messages %}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}"
        "{{ '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    ),
    Builtin(
        "llama3",
        "Llama 3 Instruct, `<|start_header_id|>role<|end_header_id|>` ... `<|eot_id|>` after BOS",
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    Builtin(
        "plain",
        "Plain text for base (not instruction-tuned) models: the system prompt, a blank line, then `User: ...` "
        "and `Assistant: ...` lines, ending with `Assistant:`; put example exchanges in the system prompt and "
        "stop at `\\nUser:`",
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] | trim + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] | trim + '\n' }}"
        "{% else %}{{ 'Assistant: ' + message['content'] | trim + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
    ),
    Builtin(
        "zephyr",
        "Zephyr, `<|system|>`, `<|user|>`, `<|assistant|>`, each turn ending with EOS",
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
    ),
)}
"""Built-in chat templates by name: what a member's ``chat_template:`` may name."""

DEFAULT = BUILTINS["chatml"]
"""The template of a file that carries none (documented in the README)."""

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def names() -> str:
    return ", ".join(BUILTINS)


def problem(value: str) -> str | None:
    """Why ``value`` cannot be a member's ``chat_template`` (None: it can)."""
    if _NAME.fullmatch(value.strip()):
        if value.strip() in BUILTINS:
            return None
        return f"unknown built-in chat template {value!r}; name one of {names()}, or give a Jinja template"
    if "{{" not in value and "{%" not in value:
        return (f"is neither a built-in's name ({names()}) nor a Jinja template (it has no {{{{ }}}} or "
                "{% %}); give one of them")
    error = _jinja_error(value)
    if error is not None:
        return f"is not a valid Jinja template ({error}); fix it, or name a built-in: {names()}"
    return None


def _jinja_error(text: str) -> str | None:
    """Compile ``text`` as llama-cpp-python's formatter does (trim_blocks, lstrip_blocks,
    loop controls, HF's ``{% generation %}`` tag): the error, or None."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2's own interface)

        def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    try:
        env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    except jinja2.TemplateError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class ChatTemplate:
    """The template a member uses, and where it came from (for `me-local models` and /api/show)."""

    text: str
    source: str
    """``file``; ``built-in NAME (models.yaml)``; ``models.yaml`` (Jinja text given there);
    ``default chatml (the file has none)``."""

    def named_for(self, file_name: str) -> str:
        """How an error names this template, used for the model file ``file_name``."""
        if self.source == "file":
            return f"the chat template of {file_name}"
        return f"the chat template used for {file_name} ({self.source})"


def choose(configured: str | None, file_template: str | None) -> ChatTemplate:
    """The template of a member whose models.yaml ``chat_template`` is ``configured`` (None:
    not set) over a file whose own template is ``file_template`` (None: it has none)."""
    if configured is not None:
        builtin = BUILTINS.get(configured.strip())
        if builtin is not None:
            return ChatTemplate(builtin.text, f"built-in {builtin.name} (models.yaml)")
        return ChatTemplate(configured, "models.yaml")
    if file_template:
        return ChatTemplate(file_template, "file")
    return ChatTemplate(DEFAULT.text, f"default {DEFAULT.name} (the file has none)")
