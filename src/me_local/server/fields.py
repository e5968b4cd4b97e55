"""Every request field of the OpenAI, Ollama and llama-server (``/infill``) routes, and what me-local
does with it.

One table per object a client sends (a route's body, a chat message, Ollama's ``options``,
``stream_options``). Each field is

* **honoured**: the route reads it and it does what the API says (within the bounds the
  route checks; its ``doc`` says where me-local differs);
* **no effect**: accepted without effect, only for fields that cannot change the output by
  definition (an end-user id, metadata, a caching hint, a load-time setting of the models,
  which models.yaml fixes);
* **refused**: a 400 naming the field, unless its value asks for nothing (``null``, ``""``,
  ``[]``, ``{}``, ``false``, or the field's own neutral value such as a ``typical_p`` of 1): clients
  send those by default (the ollama client sends ``tools: []``), and they mean "not asked for".

A key that is in no table is a 400 too (``unknown_parameter``), on both APIs: OpenAI refuses
unrecognised arguments; Ollama ignores them, but a field me-local silently ignored could be one
that changes the answer.

docs/server.md carries these tables as :func:`render_docs` writes them (a test keeps them equal:
regenerate them with ``python scripts/fields_reference.py --write``).
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
    """Refused fields: the values besides absent ones that ask for nothing (a ``typical_p`` of 1), accepted."""

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
_WINDOW = "in the last `repeat_last_n` generated tokens (default 64; -1: all of them, as OpenAI counts)"

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
    H("frequency_penalty", f"-2..2: subtracted from a token's logit for each time it occurs {_WINDOW}"),
    H("presence_penalty", f"-2..2: subtracted once from the logit of each token that occurs {_WINDOW}"),
    H("repeat_penalty", "me-local's (and llama-server's) extension: 0.01..100, divides a repeated token's "
      "logit (multiplies a negative one); 1 turns it off"),
    H("repeat_last_n", "me-local's (and llama-server's) extension: the window of the three penalties; 0 turns "
      "them off, -1: every generated token"),
    H("logit_bias", "token ids (strings of digits) to -100..100, added to their logits (-100 bans, 100 forces); "
      "the ids are the model's: an ensemble of different vocabularies takes it only for one member"),
    N("user", "an end-user id for the provider's abuse monitoring; me-local keeps nothing"),
    H("grammar", "llama-server's extension: the answer follows this GBNF grammar (see Structured output); "
      "not with `json_schema` or `response_format`"),
    H("json_schema", "llama-server's extension: the answer is JSON valid against this JSON Schema (see "
      "Structured output); not with `grammar` or `response_format`"),
]

OPENAI_CHAT = _table("OpenAI `POST /v1/chat/completions`", "a field of /v1/chat/completions", [
    H("messages", "see the message fields below"),
    *OPENAI_SHARED,
    H("max_tokens", f"at least 1; {_DEFAULT_MAX}"),
    H("max_completion_tokens", "as `max_tokens`; wins over it"),
    H("logprobs", "true: each token's log-probability (with me-local's `id` and `member`)"),
    H("top_logprobs", "0..20; needs `logprobs: true`"),
    H("tools", "function tools (custom tools: 400); the answer's calls in `message.tool_calls` "
      "(see Tool calling)"),
    H("tool_choice", "`auto`, `none`, `required`, a named function, or `allowed_tools`; `required` and a "
      "named function constrain the whole answer to calls"),
    H("parallel_tool_calls", "false: at most one call per answer (default true)"),
    R("functions", "(the deprecated form of `tools`) is not supported; send `tools`"),
    R("function_call", "(the deprecated form of `tool_choice`) is not supported; send `tool_choice`"),
    H("response_format", "`text`, `json_object`, `json_schema` (see Structured output); the messages need not "
      "mention JSON"),
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
    H("suffix", "fill in the middle: the prompt is the text before the gap, `suffix` the text after it; each "
      "member builds its prompt from its FIM tokens (`<PRE>prompt<SUF>suffix<MID>`; a model without them: "
      "400); string prompts only, not with `echo`"),
    H("response_format", "as on chat (llama-server takes it here too)"),
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
    H("tool_calls", "an assistant's calls (`arguments`: a JSON object as text), rendered as its members "
      "write calls"),
    H("tool_call_id", "the call a `tool` message answers"),
    R("function_call", "(the deprecated form of `tool_calls`) is not supported; send `tool_calls`"),
    R("refusal", "(an earlier refusal) is not supported; put the text in `content`"),
    R("audio", "(an earlier audio answer) is not supported by me-local's text models"),
], prefix="messages[].")

OLLAMA_OPTIONS_ROWS = [
    H("temperature", "0..100"), H("top_p", "0..1"), H("top_k", "0..2^31-1"), H("min_p", "0..1"),
    H("seed", "negative: a random seed"),
    H("num_predict", f"-1 or -2: until the context is full; {_DEFAULT_MAX}"),
    H("stop", "a string or up to 16"),
    H("num_ctx", "the request's context, up to the ensemble's `max_ctx` (models.yaml; larger: 400 naming it); "
      "each member gets at most its model's trained context (`me_local.members[].n_ctx` in the answer); a "
      "slot's contexts grow to it on demand and stay until the ensemble is unloaded; default: `n_ctx`"),
    H("repeat_penalty", "0.01..100: divides a repeated token's logit (multiplies a negative one); 1 turns it off. "
      "The default is the ensemble's `sampling.repeat_penalty` (1 unless models.yaml says otherwise; Ollama's is "
      "1.1)"),
    H("repeat_last_n", "the generated tokens the penalties count (the prompt is not counted); 0 turns them "
      "off, -1: every one"),
    H("presence_penalty", "-2..2: subtracted once from the logit of each token in the window"),
    H("frequency_penalty", "-2..2: subtracted from a token's logit for each time it occurs in the window"),
    H("penalize_newline", "`true` only (Ollama's old default): newlines are penalised as any token; `false` "
      "(sparing them) is a 400, and Ollama no longer reads it"),
    H("logit_bias", "me-local's extension, as OpenAI's `logit_bias`: token ids (strings of digits) to "
      "-100..100, added to their logits"),
    R("typical_p", f"(locally typical sampling) {NOT_YET}", (1,)),
    R("tfs_z", "(tail-free sampling) is not supported (Ollama no longer reads it either)", (1,)),
    R("mirostat", f"(Mirostat sampling) {NOT_YET}", (0,)),
    N("mirostat_tau", "a setting of Mirostat, which is refused"),
    N("mirostat_eta", "a setting of Mirostat, which is refused"),
    N("num_keep", "the tokens kept when Ollama shifts the context; me-local never shifts it (a conversation "
      "that does not fit leaves out its oldest turns: `truncate`)"),
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
    H("format", "`\"json\"` (a JSON object) or a JSON Schema (see Structured output)"),
    H("keep_alive", "how long the ensemble stays loaded after this request: a duration (`\"5m\"`, "
      "`\"1h30m\"`) or seconds; 0: unloaded once its requests are done (with empty `messages`/`prompt`: "
      "at once, `done_reason: \"unload\"`); negative: for ever; default: for ever (me-local keeps its models "
      "loaded). The next request loads it again"),
    R("think", "(thinking) is not supported by me-local's models"),
    H("truncate", "`true` (the default, as Ollama's): chat messages that do not fit a member's context "
      "(`num_ctx`) leave out the oldest turns, keeping system messages and the latest message, until the "
      "prompt leaves room for the answer (`num_predict`, at most a quarter of the context); the answer's "
      "`me_local.dropped_messages` says how many; `false`: such a prompt is a 400"),
    R("shift", "(shifting the context) is not supported: generation stops with `length` at the end of "
      "the context (Ollama's default is `true`; me-local's, `false`)", (False,)),
    R("_debug_render_only", "(returning the rendered prompt) is not supported"),
]
_OLLAMA_HINTS = {**{name: _OPTION_HINT for name in (f.name for f in OLLAMA_OPTIONS_ROWS)}, **_OPENAI_HINTS}

OLLAMA_CHAT = _table("Ollama `POST /api/chat`", "a field of /api/chat", [
    H("messages", "see the message fields below; empty: the model is loaded (`done_reason: \"load\"`)"),
    *OLLAMA_SHARED,
    H("tools", "function tools; the answer's calls in `message.tool_calls` (see Tool calling)"),
], hints=_OLLAMA_HINTS)

OLLAMA_GENERATE = _table("Ollama `POST /api/generate`", "a field of /api/generate", [
    H("prompt", "the user's message (in the chat template), or with `raw` the text to continue; empty: the "
      "model is loaded"),
    H("system", "a system message before the prompt; not with `raw` (400, as Ollama)"),
    H("raw", "the prompt as written, no chat template"),
    *OLLAMA_SHARED,
    H("suffix", "fill in the middle: `prompt` is the text before the gap (may be empty), `suffix` the text after "
      "it; each member builds its prompt from its FIM tokens (`<PRE>prompt<SUF>suffix<MID>`, no chat template, "
      "with or without `raw`; a model without them: 400); not with `system`"),
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
    H("tool_calls", "an assistant's calls (`arguments`: an object), rendered as its members write calls"),
    H("tool_name", "the function a `tool` message answers"),
    H("tool_call_id", "the call a `tool` message answers"),
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

_EMBED_KEEP_ALIVE = H("keep_alive", "how long the ensemble stays loaded after this request, as on `/api/generate` "
                      "(a duration or seconds; 0: unloaded once it is answered, its embedding contexts with it; "
                      "negative or missing: for ever). The next request loads it again")
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

INFILL = _table("llama-server `POST /infill`", "a field of /infill", [
    H("input_prefix", "the text before the gap (required; `\"\"` for none)"),
    H("input_suffix", "the text after the gap (required; `\"\"` for none)"),
    H("input_extra", "other files' text, before the FIM prefix: see `input_extra[]` below"),
    H("prompt", "more text before the gap (llama.vim sends the cursor line's start), tokenized on its own and "
      "put after `input_prefix`, before `<SUF>`: where llama-server's code puts it (its README says after "
      "`<MID>`)"),
    H("n_predict", f"-1: until the context is full; 0: nothing generated (the prompt is built and counted, not "
      f"evaluated ahead); {_DEFAULT_MAX}"),
    H("max_tokens", "as `n_predict`, when that is absent (as llama-server)"),
    H("t_max_predict_ms", "once this many ms have passed since the first token, stop at the next newline"),
    H("n_indent", "stop before a line (after the first) indented by fewer spaces or tabs"),
    H("temperature", "0..100"), H("top_p", "0..1"), TOP_K, MIN_P,
    H("seed", "negative: a random seed; the same request gives the same text, streaming or not"),
    H("stop", "a string or up to 16; never part of the output"),
    H("samplers", "which of `temperature`, `top_k`, `top_p`, `min_p` and `infill` (llama.cpp's infill sampler) "
      "apply, as a list of names or llama-server's letters (`tkpmi`); unlisted ones are off, and a value sent for "
      "one is a 400; they run in me-local's order (temperature and top_k, then top_p, min_p, infill): another "
      "order is a 400; `penalties` is accepted (the penalties apply whenever their settings are sent), and `dry`, "
      "`typ_p`, `xtc` and `top_n_sigma` are accepted and do nothing (their settings are refused); `infill` needs "
      "`top_k` (1..1000) and is not for mode `ce`"),
    H("stream", "server-sent events: llama-server's partial results, then the final one (no `[DONE]`)"),
    H("response_fields", "the final result's fields to return, `a/b` for a nested one, flattened (llama-server's)"),
    MODEL, ENSEMBLE,
    N("cache_prompt", "a cache hint; me-local reuses each slot's cached prefix by itself"),
    N("t_max_prompt_ms", "a limit on prompt processing that llama-server does not apply either"),
    N("id_slot", "the slot to run in; me-local gives each request the free slot with the longest cached prefix"),
    R("n_probs", f"(token probabilities) {NOT_YET} on /infill", (0,)),
    *(f for f in OPENAI_SHARED if f.name in ("repeat_penalty", "repeat_last_n", "presence_penalty",
                                             "frequency_penalty", "logit_bias")),
    R("typical_p", f"(locally typical sampling) {NOT_YET}", (1,)),
    R("mirostat", f"(Mirostat sampling) {NOT_YET}", (0,)),
    R("dynatemp_range", f"(dynamic temperature) {NOT_YET}", (0,)),
    R("xtc_probability", f"(XTC sampling) {NOT_YET}", (0,)),
    R("dry_multiplier", f"(DRY repetition penalty) {NOT_YET}", (0,)),
    R("top_n_sigma", f"(top-n-sigma sampling) {NOT_YET}", (-1,)),
    R("grammar", f"(grammar-constrained output) {NOT_YET}"),
    R("json_schema", f"(schema-constrained output) {NOT_YET}"),
    R("ignore_eos", "(generating past the end of generation) is not supported"),
    R("lora", "(LoRA adapters) are not supported"),
    R("timings_per_token", "(timings in every partial result) is not supported; the final result has them"),
    R("return_tokens", "(token ids in the result) is not supported on /infill"),
    R("post_sampling_probs", f"(token probabilities) {NOT_YET} on /infill"),
])

INFILL_EXTRA = _table("`/infill` extra context (`input_extra[i]`)", "a field of an `input_extra` chunk", [
    H("text", "the chunk's text (required)"),
    H("filename", "its file's name (default `tmp`), after `<FIM_SEP>` when the model has that token"),
    N("time", "when llama.vim picked the chunk; llama-server does not read it either"),
], prefix="input_extra[].")

TABLES = (OPENAI_CHAT, OPENAI_COMPLETIONS, STREAM_OPTIONS, OPENAI_MESSAGE,
          OLLAMA_CHAT, OLLAMA_GENERATE, OLLAMA_OPTIONS, OLLAMA_MESSAGE, INFILL, INFILL_EXTRA,
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


def check_messages(messages: Any, table: Table, key: str = "messages") -> None:
    """:func:`check` on each message (or ``key``'s other list items) that is an object (the rest is the
    list's own check)."""
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if isinstance(m, dict):
                check(m, table, f"{key}[{i}].")


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
