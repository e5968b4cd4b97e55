"""Chat templates: rendering a model's Jinja template (llama-cpp-python's formatter),
and splitting a rendering at the messages' contents, so that the template's markup and
the users' text can be tokenized apart (see :meth:`LoadedModel.chat_tokens`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ... import chat_templates
from ...errors import RequestError
from ..types import ChatMessage, ToolDefinitions

#: Used when a GGUF file carries no ``tokenizer.chat_template`` and its member sets none
#: (ChatML; documented in the README): :data:`me_local.chat_templates.DEFAULT`.
DEFAULT_CHAT_TEMPLATE = chat_templates.DEFAULT.text

#: Whitespace put around a content mark to see whether a chat template trims message content.
PAD = " \u3000\t"


@cache
def chat_formatter(template: str, eos_text: str, bos_text: str) -> Jinja2ChatFormatter:
    """A compiled chat template (compiling takes milliseconds; rendering is thread-safe)."""
    return Jinja2ChatFormatter(template, eos_token=eos_text, bos_token=bos_text)


def render(template: str, messages: Sequence[ChatMessage], *, eos_text: str, bos_text: str, who: str,
           tools: ToolDefinitions | None = None) -> str:
    """The prompt text ``template`` makes of ``messages`` (and ``tools``, as llama.cpp and Ollama
    pass them: OpenAI's list); ``who`` names the template in errors."""
    try:
        formatter = chat_formatter(template, eos_text, bos_text)
        extra = {"tools": [dict(t) for t in tools]} if tools else {}
        return formatter(messages=list(messages), **extra).prompt  # type: ignore[arg-type]
    except Exception as exc:  # a template error is the request's (roles) or the template's fault
        raise RequestError(
            f"{who} rejected these messages ({exc}); check the roles and their order",
            param="messages",
        ) from None


def split_at_contents(
    render_messages: Callable[[Sequence[ChatMessage]], str],
    messages: Sequence[ChatMessage],
    marked: Mapping[int, Sequence[str]],
    refuse: Callable[[int], RequestError],
) -> list[tuple[str, bool]]:
    """The rendering of ``messages`` as pieces ``(text, is message content)``, the contents
    of the ``marked`` messages on their own.

    Renders the template with a unique mark in place of each marked message's content and
    splits the text at the marks. A template that trims the content or leaves a message out
    is followed; one that rewrites it otherwise cannot be, and ``refuse(i)`` (the error for
    message ``i``) is raised rather than a guess."""
    tag = os.urandom(6).hex()
    marks = {i: f"\ue000me-local-content-{tag}-{i}\ue001" for i in marked}
    probe = [dict(m) for m in messages]
    for i, mark in marks.items():
        probe[i]["content"] = PAD + mark + PAD
    text = render_messages(probe)

    hits = []
    for i, mark in marks.items():
        n = text.count(mark)
        if n == 1:
            hits.append((text.index(mark), i))
        elif n or f"{tag}-{i}" in text.lower():  # repeated or rewritten
            raise refuse(i)
        # else the template left this message's content out: nothing of it to tokenize
    pieces: list[tuple[str, bool]] = []  # (text, is message content)
    pos = 0
    for at, i in sorted(hits):
        content = str(messages[i].get("content") or "")
        before = text[pos:at]
        # the template kept the padding around the mark, or trimmed it (Jinja's `trim`)
        if before.endswith(PAD):
            before = before[: -len(PAD)]
        else:
            content = content.lstrip()
        pos = at + len(marks[i])
        if text.startswith(PAD, pos):
            pos += len(PAD)
        else:
            content = content.rstrip()
        pieces += [(before, False), (content, True)]
    pieces.append((text[pos:], False))
    for piece, is_content in pieces:
        if not is_content and (PAD in piece or "\ue000" in piece or "\ue001" in piece):
            raise refuse(min(marked))  # the template cut or moved a mark or its padding: do not guess
    return pieces
