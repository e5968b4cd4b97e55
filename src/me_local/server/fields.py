"""Every request field of the OpenAI and Ollama routes, and what me-local does with it.

One table per object a client sends (a route's body, a chat message, Ollama's ``options``,
``stream_options``). Each field is

* **honoured**: the route reads it and it does what the API says (within the bounds the
  route checks; its ``doc`` says where me-local differs);
* **no effect**: accepted without effect, only for fields that cannot change the output by
  definition (an end-user id, metadata, a caching hint, a load-time setting of the models,
  which models.yaml fixes);
* **refused**: a 400 naming the field, unless its value asks for nothing (``null``, ``""``,
  ``[]``, ``{}``, ``false``, or the field's own neutral value such as a penalty of 0): clients
  send those by default (the ollama client sends ``tools: []``), and they mean "not asked for".

A key that is in no table is a 400 too (``unknown_parameter``), on both APIs: OpenAI refuses
unrecognised arguments; Ollama ignores them, but a field me-local silently ignored could be one
that changes the answer.

docs/server.md carries these tables as :func:`render_docs` writes them (a test keeps them equal:
regenerate with ``python -c "from me_local.server.fields import render_docs; print(render_docs())"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ApiError

Kind = Literal["honoured", "no effect", "refused"]


def absent(v: Any) -> bool:
    """``null``, ``""``, ``[]``, ``{}`` or ``false``: what clients send for "not asked for"."""
    return v is None or v is False or (isinstance(v, (str, list, dict)) and not v)


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    doc: str
    """What me-local does with it (honoured, no effect), or what it asks for that me-local does not do
    (refused: the 400's message, after the field's name)."""
    neutral_values: tuple[Any, ...] = ()
    """Refused fields: the values besides absent ones that ask for nothing (a penalty of 0), accepted."""

    def neutral(self, value: Any) -> bool:
        """``value`` asks for nothing: absent, or a neutral value (``true`` is not 1 here)."""
        return absent(value) or (not isinstance(value, bool) and any(value == x for x in self.neutral_values))

    @property
    def neutral_doc(self) -> str:
        """The neutral values as JSON, as the docs and the 400 show them."""
        return ", ".join(json.dumps(v) for v in self.neutral_values)


@dataclass(frozen=True)
class Table:
    title: str
    where: str
    """What the object is, for the 400 on an unknown key ("a field of /v1/completions")."""
    fields: dict[str, Field]
    prefix: str = ""
    """The fields' path in the request body (``options.``, ``messages[].``)."""
    hints: dict[str, str] = field(default_factory=dict)
    """Unknown keys worth a pointer: what to send instead."""

    def path(self, name: str) -> str:
        return self.prefix + name


def _table(title: str, where: str, rows: list[Field], prefix: str = "",
           hints: dict[str, str] | None = None) -> Table:
    return Table(title, where, {f.name: f for f in rows}, prefix, hints or {})


def H(name: str, doc: str) -> Field:
    return Field(name, "honoured", doc)


def N(name: str, doc: str) -> Field:
    return Field(name, "no effect", doc)


def R(name: str, doc: str, neutral: tuple[Any, ...] = ()) -> Field:
    return Field(name, "refused", doc, neutral)


NOT_YET = "is not supported yet"
TOOLS = f"(tool calling) {NOT_YET}"
STRUCTURED = f"(structured output) {NOT_YET}"
PENALTY = f"(a repetition penalty) {NOT_YET}"

ENSEMBLE = H("ensemble", "me-local's extension: `mode`, `granularity`, `weights`, `member` for this request")
MODEL = H("model", "an ensemble or `ENSEMBLE/MEMBER`; missing: the default ensemble")
STREAM_OPENAI = H("stream", "server-sent events")
TOP_K = H("top_k", "me-local's (and llama-server's) extension")
MIN_P = H("min_p", "me-local's (and llama-server's) extension")
_DEFAULT_MAX = "default: the ensemble's `sampling.max_tokens`"
OPENAI_SHARED = [
    MODEL, STREAM_OPENAI,
    H("stream_options", "see `stream_options` below"),
    H("temperature", "0..100"), H("top_p", "0..1"), TOP_K, MIN_P,
    H("seed", "0..2^63-1; the same request gives the same text, streaming or not"),
    H("stop", "a string or up to 16; never part of the output"),
    H("n", "only 1 (400 otherwise)"),
    ENSEMBLE,
    R("frequency_penalty", PENALTY, (0,)), R("presence_penalty", PENALTY, (0,)),
    R("logit_bias", f"(token biases) {NOT_YET}"),
    N("user", "an end-user id for the provider's abuse monitoring; me-local keeps nothing"),
    R("grammar", f"(llama-server's grammar-constrained output) {NOT_YET}"),
    R("json_schema", f"(llama-server's schema-constrained output) {NOT_YET}"),
]

OPENAI_CHAT = _table("OpenAI `POST /v1/chat/completions`", "a field of /v1/chat/completions", [
    H("messages", "see the message fields below"),
    *OPENAI_SHARED,
    H("max_tokens", f"at least 1; {_DEFAULT_MAX}"),
    H("max_completion_tokens", "as `max_tokens`; wins over it"),
    H("logprobs", "true: each token's log-probability (with me-local's `id` and `member`)"),
    H("top_logprobs", "0..20; needs `logprobs: true`"),
    R("tools", TOOLS), R("tool_choice", TOOLS), R("parallel_tool_calls", TOOLS),
    R("functions", f"(the deprecated form of `tools`) {NOT_YET}"),
    R("function_call", f"(the deprecated form of `tool_choice`) {NOT_YET}"),
    R("response_format", STRUCTURED, ({"type": "text"},)),
    R("audio", "(audio output) is not supported by me-local's text models"),
    R("modalities", "(output modalities other than text) are not supported by me-local's text models",
      (["text"],)),
    R("prediction", "(predicted outputs) is not supported"),
    R("web_search_options", "(web search) is not supported"),
    R("reasoning_effort", "(reasoning models' effort) is not supported by me-local's models"),
    R("verbosity", "(reasoning models' answer length) is not supported by me-local's models"),
    R("moderation", "(moderation of the answer) is not supported"),
    R("store", "(storing the completion) is not supported: me-local stores nothing"),
    N("metadata", "tags for stored completions; me-local stores nothing"),
    N("safety_identifier", "an end-user id for the provider's abuse monitoring; me-local keeps nothing"),
    N("prompt_cache_key", "a routing hint for the provider's prompt cache; me-local reuses each slot's "
      "cached prefix by itself"),
    N("prompt_cache_retention", "how long the provider keeps its prompt cache; no effect on the answer"),
    N("prompt_cache_options", "the provider's prompt cache settings; no effect on the answer"),
    N("service_tier", "the provider's processing tier (latency, price); me-local has one"),
])

OPENAI_COMPLETIONS = _table("OpenAI `POST /v1/completions`", "a field of /v1/completions", [
    H("prompt", "a string (raw text, no chat template), a list of token ids, or a batch of either"),
    *OPENAI_SHARED,
    H("max_tokens", f"at least 1 (0 with `echo`: nothing generated); {_DEFAULT_MAX}"),
    H("max_completion_tokens", "me-local's extension: as `max_tokens`; wins over it"),
    H("logprobs", "an integer 0..20: each token's log-probability and that many alternatives"),
    H("echo", "the prompt first in the text (and, with `logprobs`, its tokens' log-probabilities)"),
    H("best_of", "only 1 (400 otherwise)"),
    R("suffix", f"(fill-in-the-middle) {NOT_YET}"),
    R("response_format", STRUCTURED, ({"type": "text"},)),
], hints={"top_logprobs": "completions take an integer `logprobs` (the number of alternatives)",
          "messages": "send chat messages to /v1/chat/completions"})

STREAM_OPTIONS = _table("`stream_options` (both routes)", "a field of `stream_options`", [
    H("include_usage", "a last chunk with `choices: []` and `usage` (with `stream: true`)"),
    N("include_obfuscation", "random padding of stream chunks against length side channels; "
      "me-local adds none, the text is the same"),
], prefix="stream_options.")

OPENAI_MESSAGE = _table("OpenAI chat message (`messages[i]`)", "a field of a chat message", [
    H("role", "`system`, `developer` (as `system`), `user`, `assistant`, `tool`"),
    H("content", "a string or a list of text parts; other parts are refused"),
    R("name", "(a participant's name) is not passed to the chat templates"),
    R("tool_calls", TOOLS), R("tool_call_id", TOOLS),
    R("function_call", f"(the deprecated form of `tool_calls`) {NOT_YET}"),
    R("refusal", "(an earlier refusal) is not supported; put the text in `content`"),
    R("audio", "(an earlier audio answer) is not supported by me-local's text models"),
], prefix="messages[].")

OLLAMA_OPTIONS_ROWS = [
    H("temperature", "0..100"), H("top_p", "0..1"), H("top_k", "0..2^31-1"), H("min_p", "0..1"),
    H("seed", "negative: a random seed"),
    H("num_predict", f"-1 or -2: until the context is full; {_DEFAULT_MAX}"),
    H("stop", "a string or up to 16"),
    H("num_ctx", "at most the ensemble's `n_ctx` (models.yaml), which is the context every request "
      "gets (a prompt longer than `num_ctx` is used whole, not cut); larger: 400 naming the fix"),
    R("repeat_penalty", PENALTY, (1,)), R("presence_penalty", PENALTY, (0,)),
    R("frequency_penalty", PENALTY, (0,)),
    N("repeat_last_n", "the window of the penalties, which are refused"),
    N("penalize_newline", "a switch of the penalties, which are refused (Ollama no longer reads it)"),
    R("typical_p", f"(locally typical sampling) {NOT_YET}", (1,)),
    R("tfs_z", "(tail-free sampling) is not supported (Ollama no longer reads it either)", (1,)),
    R("mirostat", f"(Mirostat sampling) {NOT_YET}", (0,)),
    N("mirostat_tau", "a setting of Mirostat, which is refused"),
    N("mirostat_eta", "a setting of Mirostat, which is refused"),
    N("num_keep", "the tokens kept when Ollama shifts the context; me-local never shifts it (a prompt "
      "that does not fit is a 400)"),
    *[N(name, f"how the models are loaded and run (speed, memory), not what they answer; models.yaml's "
      f"{setting} sets it for the daemon")
      for name, setting in [("num_batch", "`n_batch`"), ("num_gpu", "`n_gpu_layers`"),
                            ("main_gpu", "`n_gpu_layers`"), ("num_thread", "`n_threads`"),
                            ("use_mmap", "`mmap`"), ("use_mlock", "`mmap`"), ("numa", "the system"),
                            ("low_vram", "`n_gpu_layers`"), ("f16_kv", "`kv_cache_type`"),
                            ("logits_all", "the engine"), ("vocab_only", "the engine"),
                            ("embedding_only", "the engine")]],
]
OLLAMA_OPTIONS = _table("Ollama `options` (both routes)", "an Ollama option", OLLAMA_OPTIONS_ROWS,
                        prefix="options.")

_OPTION_HINT = "it is an option: put it in `options`"
_OPENAI_HINTS = {"max_tokens": "Ollama's limit is `options.num_predict`"}

OLLAMA_SHARED = [
    MODEL, H("stream", "NDJSON, the default; `false`: one object"),
    H("options", "see `options` below"),
    H("logprobs", "true: Ollama's `logprobs` list (with me-local's `id` and `member`)"),
    H("top_logprobs", "0..20; needs `logprobs: true`"),
    ENSEMBLE,
    R("format", STRUCTURED),
    N("keep_alive", "how long Ollama keeps the model loaded; me-local keeps every model loaded while it runs "
      "(with empty `messages`/`prompt`, 0 answers `done_reason: \"unload\"`)"),
    R("think", "(thinking) is not supported by me-local's models"),
    R("truncate", "(cutting the history to fit the context) is not supported: a prompt that does not fit "
      "is a 400 (Ollama's default is `true`; me-local's, `false`)", (False,)),
    R("shift", "(shifting the context) is not supported: generation stops with `length` at the end of "
      "the context (Ollama's default is `true`; me-local's, `false`)", (False,)),
    R("_debug_render_only", "(returning the rendered prompt) is not supported"),
]
_OLLAMA_HINTS = {**{name: _OPTION_HINT for name in (f.name for f in OLLAMA_OPTIONS_ROWS)}, **_OPENAI_HINTS}

OLLAMA_CHAT = _table("Ollama `POST /api/chat`", "a field of /api/chat", [
    H("messages", "see the message fields below; empty: the model is loaded (`done_reason: \"load\"`)"),
    *OLLAMA_SHARED,
    R("tools", TOOLS),
], hints=_OLLAMA_HINTS)

OLLAMA_GENERATE = _table("Ollama `POST /api/generate`", "a field of /api/generate", [
    H("prompt", "the user's message (in the chat template), or with `raw` the text to continue; empty: the "
      "model is loaded"),
    H("system", "a system message before the prompt; not with `raw` (400, as Ollama)"),
    H("raw", "the prompt as written, no chat template"),
    *OLLAMA_SHARED,
    R("suffix", f"(fill-in-the-middle) {NOT_YET}"),
    R("images", "(image input) is not supported by me-local's text models"),
    R("template", "(a prompt template of the request's own) is not supported; send `raw` text instead"),
    R("context", "(the context of an earlier answer) is not supported; send the text, or use /api/chat"),
    R("width", "(image generation) is not supported"), R("height", "(image generation) is not supported"),
    R("steps", "(image generation) is not supported"),
], hints=_OLLAMA_HINTS)

OLLAMA_MESSAGE = _table("Ollama chat message (`messages[i]`)", "a field of a chat message", [
    H("role", "`system`, `user`, `assistant`, `tool`"),
    H("content", "text"),
    R("images", "(image input) is not supported by me-local's text models"),
    R("thinking", "(an earlier answer's thinking) is not supported by me-local's models"),
    R("tool_calls", TOOLS), R("tool_name", TOOLS), R("tool_call_id", TOOLS),
], prefix="messages[].")

_DIMENSIONS = ("only the vectors' own length (400 otherwise, naming it): me-local's models are not trained to "
               "be cut to fewer")
OPENAI_EMBEDDINGS = _table("OpenAI `POST /v1/embeddings`", "a field of /v1/embeddings", [
    H("input", "a string, a list of strings, a list of token ids or a list of such lists (at most 2048 inputs); "
      "an input longer than the context is a 400"),
    H("model", "an ensemble (its members' vectors concatenated, see [Embeddings](#embeddings)) or "
      "`ENSEMBLE/MEMBER`; missing: the default ensemble"),
    H("encoding_format", "`float` (default) or `base64` (little-endian float32)"),
    H("dimensions", _DIMENSIONS),
    N("user", "an end-user id for the provider's abuse monitoring; me-local keeps nothing"),
])

_EMBED_KEEP_ALIVE = N("keep_alive", "how long Ollama keeps the model loaded; me-local keeps the embedding "
                      "contexts, made on first use, while it runs")
_SAMPLING_ONLY = "a generation setting; an embedding generates nothing"
_LOAD_TIME = ("num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa", "low_vram",
              "f16_kv", "logits_all", "vocab_only", "embedding_only")
OLLAMA_EMBED_OPTIONS = _table("Ollama `options` (`/api/embed`, `/api/embeddings`)", "an Ollama option", [
    H("num_ctx", "the most tokens an input may have (longer: cut or 400, see `truncate`), at most the ensemble's "
      "`n_ctx` (larger: 400 naming the fix)"),
    *[OLLAMA_OPTIONS.fields[name] if name in _LOAD_TIME else N(name, _SAMPLING_ONLY)
      for name in OLLAMA_OPTIONS.fields if name != "num_ctx"],
], prefix="options.")

OLLAMA_EMBED = _table("Ollama `POST /api/embed`", "a field of /api/embed", [
    MODEL,
    H("input", "a string or a list of strings; empty: no vectors, and the embedding contexts are made (loaded)"),
    H("truncate", "`true` (default): an input longer than the context is cut to its first tokens (its EOS kept, "
      "where the model adds one), and `me_local.truncated` lists it; `false`: a 400"),
    H("options", "see `options` below"),
    H("dimensions", _DIMENSIONS + " (Ollama cuts and renormalises)"),
    _EMBED_KEEP_ALIVE,
], hints={**{f.name: _OPTION_HINT for f in OLLAMA_OPTIONS_ROWS}, "prompt": "/api/embed takes `input`"})

OLLAMA_EMBEDDINGS = _table("Ollama `POST /api/embeddings` (the older route)", "a field of /api/embeddings", [
    MODEL,
    H("prompt", "a string; empty: `{\"embedding\": []}`, and the embedding contexts are made. An input longer "
      "than the context is a 400"),
    H("options", "see `options` above"),
    _EMBED_KEEP_ALIVE,
], hints={**{f.name: _OPTION_HINT for f in OLLAMA_OPTIONS_ROWS}, "input": "/api/embeddings takes `prompt`; "
          "/api/embed takes `input`"})

TABLES = (OPENAI_CHAT, OPENAI_COMPLETIONS, STREAM_OPTIONS, OPENAI_MESSAGE,
          OLLAMA_CHAT, OLLAMA_GENERATE, OLLAMA_OPTIONS, OLLAMA_MESSAGE,
          OPENAI_EMBEDDINGS, OLLAMA_EMBED, OLLAMA_EMBEDDINGS, OLLAMA_EMBED_OPTIONS)


def check(obj: dict[str, Any], table: Table, at: str | None = None) -> None:
    """A 400 for the first key of ``obj`` that is in no row of ``table`` (``unknown_parameter``) or
    refused with a value that asks for something (``unsupported_parameter``). ``at`` is the object's
    path in the body when it is not the table's prefix (``messages[2].``)."""
    prefix = table.prefix if at is None else at
    for key, value in obj.items():
        path = prefix + key
        row = table.fields.get(key)
        if row is None:
            hint = table.hints.get(key, "remove it")
            raise ApiError(400, f"`{path}` is not {table.where}; {hint}", code="unknown_parameter", param=path)
        if row.kind == "refused" and not row.neutral(value):
            also = f" (or send {row.neutral_doc})" if row.neutral_doc else ""
            raise ApiError(400, f"`{path}` {row.doc}; remove it{also}", code="unsupported_parameter", param=path)


def check_messages(messages: Any, table: Table) -> None:
    """:func:`check` on each message that is an object (the rest is the messages' own check)."""
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if isinstance(m, dict):
                check(m, table, f"messages[{i}].")


def render_docs() -> str:
    """The tables as docs/server.md shows them."""
    out = []
    for table in TABLES:
        out += [f"**{table.title}**", "", "| field | me-local |", "|---|---|"]
        for f in table.fields.values():
            if f.kind == "honoured":
                what = f.doc
            elif f.kind == "no effect":
                what = f"no effect: {f.doc}"
            else:
                neutral = f"; `{f.neutral_doc}` and empty values are accepted" if f.neutral_doc else ""
                what = f"400: `{f.name}` {f.doc}{neutral}"
            out.append(f"| `{table.path(f.name)}` | {what} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
