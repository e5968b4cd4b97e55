"""Every setting me-local has, declared once: its name, type, default, bounds,
one line of help, and the places it can be given.

The places are models.yaml (an ensemble's keys, a member's keys, an ensemble's
``sampling:`` block), a command-line flag, a field of the OpenAI API, a field of
the Ollama API (most under ``options``) and chat's ``/set``. Each of them derives
its check from here: :mod:`me_local.config` validates models.yaml with these
bounds, :mod:`me_local.cli.options` builds click options from a Setting,
:mod:`me_local.server.params` bounds both APIs' fields, chat's ``/set`` knows
what it may set and the README's "Settings reference" is rendered from this
table (``scripts/settings_reference.py``; a test keeps it in step).

Each place words its own error (a YAML key and the file, a JSON field and its
``param``, a flag); what is refused is the same everywhere.

This module is pure: standard library only, so the core (numpy only) takes the
defaults of :class:`~me_local.core.SamplingParams` from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")

Group = Literal["sampling", "ensemble", "member", "server"]
"""What a setting belongs to. In models.yaml a ``sampling`` setting sits in an ensemble's
``sampling:`` block, an ``ensemble`` one among the ensemble's keys, a ``member`` one in a member."""

Number = int | float


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting. ``lo``/``hi`` bound a number (or, for a list, ``hi`` bounds its length);
    ``choices`` lists the values a text setting may take. A place set to None does not
    take the setting."""

    name: str
    type: type
    """int, float, str, bool, tuple for a list of strings, or dict for token ids to numbers (``logit_bias``:
    ``lo``/``hi`` bound the numbers)."""
    default: T
    help: str
    group: Group
    lo: Number | None = None
    hi: Number | None = None
    choices: tuple[str, ...] = ()
    yaml: bool = False
    """Given in models.yaml, under ``name`` (where ``group`` says)."""
    flag: str | None = None
    """The command-line flag (``--top-k``)."""
    short: str | None = None
    """Its one-letter form (``-t``)."""
    openai: str | None = None
    """The OpenAI request field; a dot reaches into an object (``ensemble.mode``)."""
    ollama: str | None = None
    """The Ollama request field (``options.top_k``)."""
    chat: str | None = None
    """The name chat's ``/set`` takes."""
    default_text: str | None = None
    """How the reference shows a default that is decided at run time."""
    openai_also: tuple[str, ...] = ()
    """Other OpenAI fields that give it (``max_completion_tokens``; completions' integer ``logprobs``)."""

    def within(self, value: Number) -> bool:
        """Whether a number lies within the bounds."""
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def bounds_text(self) -> str:
        """The bounds as the reference shows them: ``0 .. 1``, ``>= 16``, ``me | ce | single``."""
        if self.choices:
            return " | ".join(self.choices)
        if self.type is dict:
            return f"token id: {show_number(self.lo or 0)} .. {show_number(self.hi or 0)}"
        if self.type is tuple:
            return f"at most {self.hi} strings" if self.hi is not None else ""
        if self.lo is not None and self.hi is not None:
            return f"{show_number(self.lo)} .. {show_number(self.hi)}"
        if self.lo is not None:
            return f">= {show_number(self.lo)}"
        return ""

    def default_shown(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, tuple):
            return "none" if not self.default else ", ".join(map(str, self.default))
        return str(self.default)


def show_number(v: Number) -> str:
    """A bound as people write it: 2^31-1 rather than 2147483647."""
    if isinstance(v, int) and v >= 2**16 and (v + 1) & v == 0:
        return f"2^{(v + 1).bit_length() - 1}-1"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1e6:
        return f"{v:.0e}".replace("e+0", "e").replace("e+", "e")
    return str(v)


# --------------------------------------------------------------------------- sampling

TEMPERATURE: Setting[float] = Setting(
    "temperature", float, 0.8, "0 is greedy.", "sampling", lo=0, hi=100, yaml=True,
    flag="--temperature", short="-t", openai="temperature", ollama="options.temperature", chat="temperature")
TOP_P: Setting[float] = Setting(
    "top_p", float, 0.95, "1 turns it off.", "sampling", lo=0, hi=1, yaml=True,
    flag="--top-p", openai="top_p", ollama="options.top_p", chat="top_p")
TOP_K: Setting[int] = Setting(
    "top_k", int, 40, "0 turns it off.", "sampling", lo=0, hi=2**31 - 1, yaml=True,
    flag="--top-k", openai="top_k", ollama="options.top_k", chat="top_k")
MIN_P: Setting[float] = Setting(
    "min_p", float, 0.05, "0 turns it off.", "sampling", lo=0, hi=1, yaml=True,
    flag="--min-p", openai="min_p", ollama="options.min_p", chat="min_p")
MAX_TOKENS: Setting[int] = Setting(
    "max_tokens", int, 512, "Most tokens to generate.", "sampling", lo=1, yaml=True,
    flag="--max-tokens", short="-n", openai="max_tokens", ollama="options.num_predict", chat="max_tokens",
    openai_also=("max_completion_tokens",))
SEED: Setting[int | None] = Setting(
    "seed", int, None, "Fixes member schedule and sampling.", "sampling", lo=0, hi=2**63 - 1,
    flag="--seed", openai="seed", ollama="options.seed", chat="seed", default_text="random")
STOP: Setting[tuple[str, ...]] = Setting(
    "stop", tuple, (), "Stop string; never part of the output. models.yaml's apply to every request, beside the "
    "request's own.", "sampling", hi=16, yaml=True, flag="--stop", openai="stop", ollama="options.stop")
TOP_LOGPROBS: Setting[int] = Setting(
    "top_logprobs", int, 0, "Alternatives listed with each token's logprob (completions: the integer `logprobs`).",
    "sampling",
    lo=0, hi=20, openai="top_logprobs", ollama="top_logprobs",
    openai_also=("logprobs",))

REPEAT_PENALTY: Setting[float] = Setting(
    "repeat_penalty", float, 1.0, "Divides the logit of a token in the last `repeat_last_n` generated tokens "
    "(multiplies it when negative); 1 turns it off.", "sampling", lo=0.01, hi=100, yaml=True,
    flag="--repeat-penalty", openai="repeat_penalty", ollama="options.repeat_penalty", chat="repeat_penalty")
REPEAT_LAST_N: Setting[int] = Setting(
    "repeat_last_n", int, 64,
    "The last generated tokens (not the prompt) the three penalties count; 0 turns them off, -1: all.",
    "sampling", lo=-1, hi=2**31 - 1, yaml=True, flag="--repeat-last-n", openai="repeat_last_n",
    ollama="options.repeat_last_n", chat="repeat_last_n")
FREQUENCY_PENALTY: Setting[float] = Setting(
    "frequency_penalty", float, 0.0, "Subtracted from a token's logit for each time it occurs in the last "
    "`repeat_last_n` generated tokens.", "sampling", lo=-2, hi=2, yaml=True, flag="--frequency-penalty",
    openai="frequency_penalty", ollama="options.frequency_penalty", chat="frequency_penalty")
PRESENCE_PENALTY: Setting[float] = Setting(
    "presence_penalty", float, 0.0, "Subtracted from a token's logit once if it occurs in the last "
    "`repeat_last_n` generated tokens.", "sampling", lo=-2, hi=2, yaml=True, flag="--presence-penalty",
    openai="presence_penalty", ollama="options.presence_penalty", chat="presence_penalty")
LOGIT_BIAS: Setting[tuple[tuple[int, float], ...]] = Setting(
    "logit_bias", dict, (), "Added to these token ids' logits (-100 bans a token, 100 forces it); "
    "models.yaml's apply to every request, under the request's own.", "sampling", lo=-100, hi=100, yaml=True,
    flag="--logit-bias", openai="logit_bias", ollama="options.logit_bias", chat="logit_bias")
"""Given as ``{token id: bias}`` (JSON keys are strings of digits; the flag and ``/set`` take
``ID=BIAS``); held as (id, bias) pairs sorted by id. The ids are one vocabulary's: an ensemble
whose members have different vocabularies takes it only for one member (``single``)."""

PENALTIES = (REPEAT_PENALTY, REPEAT_LAST_N, FREQUENCY_PENALTY, PRESENCE_PENALTY)
"""llama.cpp's penalties sampler's settings (plain bounded numbers everywhere)."""


def logit_bias_entry(token: object, bias: object) -> tuple[int, float]:
    """One entry of a logit bias: a token id (an integer >= 0, or a string of its digits, as JSON
    keys are) and a finite number within :data:`LOGIT_BIAS`'s bounds. ValueError says what is
    wrong, for each place to word its own error."""
    if isinstance(token, str) and token.isascii() and token.isdigit():
        token = int(token)
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise ValueError(f"{token!r} is not a token id (an integer >= 0)")
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or bias != bias or bias in (
            float("inf"), float("-inf")):
        raise ValueError(f"the bias of token {token} must be a number, got {bias!r}")
    assert LOGIT_BIAS.lo is not None and LOGIT_BIAS.hi is not None
    if not LOGIT_BIAS.lo <= bias <= LOGIT_BIAS.hi:
        raise ValueError(f"the bias of token {token} must be between {show_number(LOGIT_BIAS.lo)} and "
                         f"{show_number(LOGIT_BIAS.hi)}, got {bias}")
    return token, float(bias)


def comma_pairs(text: str) -> list[tuple[str, str | None]]:
    """The ``KEY=VALUE`` items of a comma-separated list (a flag, chat's ``/set``): (key, value),
    stripped of surrounding spaces (value None for an item without ``=``); empty items are skipped."""
    out: list[tuple[str, str | None]] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            key, sep, value = part.partition("=")
            out.append((key.strip(), value.strip() if sep else None))
    return out


def parse_logit_bias(text: str) -> dict[int, float]:
    """``ID=BIAS[,ID=BIAS...]`` (the flag, chat's ``/set``); ValueError says what is wrong."""
    out: dict[int, float] = {}
    for token, value in comma_pairs(text):
        if value is None:
            raise ValueError(f"cannot read {token!r}; write a token id and its bias as ID=BIAS, e.g. 13=-100")
        try:
            bias: object = float(value)
        except ValueError:
            bias = value
        tid, b = logit_bias_entry(token, bias)
        out[tid] = b
    if not out:
        raise ValueError(f"cannot read {text!r}; write a token id and its bias as ID=BIAS, e.g. 13=-100")
    return out


# --------------------------------------------------------------------------- ensemble

MODE: Setting[str] = Setting(
    "mode", str, "me", "Decoding mode: mixture-model-like ensemble, conventional, or one member.", "ensemble",
    choices=("me", "ce", "single"), yaml=True, flag="--mode", openai="ensemble.mode", ollama="ensemble.mode",
    chat="mode")
GRANULARITY: Setting[str | None] = Setting(
    "granularity", str, None, "What `me` draws a member for: each token (members share a vocabulary) or each "
    "word (any members).", "ensemble", choices=("token", "word"), yaml=True, flag="--granularity",
    openai="ensemble.granularity", ollama="ensemble.granularity", chat="granularity",
    default_text="token if the members share a vocabulary; else word")
MEMBER: Setting[str | None] = Setting(
    "member", str, None, "The member `single` mode uses (default: the first).", "ensemble", yaml=True,
    flag="--member", openai="ensemble.member", ollama="ensemble.member", chat="member", default_text="the first")
N_CTX: Setting[int] = Setting(
    "n_ctx", int, 4096, "Context window per member, in tokens: what a request gets unless it asks for another "
    "size (Ollama's `options.num_ctx`, up to `max_ctx`).", "ensemble", lo=16, yaml=True, ollama="options.num_ctx")
MAX_CTX_DEFAULT = 32768
"""``max_ctx`` when models.yaml sets none (or ``n_ctx``, when that is larger): what Cline asks for."""
MAX_CTX: Setting[int | None] = Setting(
    "max_ctx", int, None, "The largest context a request may ask for (Ollama's `options.num_ctx`; more is a 400). "
    "A member never gets more than its model's trained context.", "ensemble", lo=16, yaml=True,
    default_text=f"{MAX_CTX_DEFAULT} or n_ctx if larger")
PARALLEL: Setting[int] = Setting(
    "parallel", int, 1, "Slots for `me-local serve`; each holds one context per member.", "ensemble", lo=1,
    yaml=True)
MAX_QUEUE: Setting[int] = Setting(
    "max_queue", int, 16, "Requests waiting beyond the slots, served first come first served.", "ensemble",
    lo=0, yaml=True)
N_BATCH: Setting[int] = Setting(
    "n_batch", int, 512, "Prompt tokens per decode call.", "ensemble", lo=1, yaml=True)
KV_CACHE_TYPE: Setting[str] = Setting(
    "kv_cache_type", str, "f16", "Element type of each context's KV cache; q8_0 halves it, q4_0 quarters it.",
    "ensemble", choices=("f16", "q8_0", "q4_0"), yaml=True)

# --------------------------------------------------------------------------- member

WEIGHT: Setting[float] = Setting(
    "weight", float, 1.0, "The member's share, normalised over the ensemble; not all zero.", "member",
    lo=0, hi=1e6, yaml=True, flag="--weights", openai="ensemble.weights", ollama="ensemble.weights",
    chat="weights")
SYSTEM: Setting[str | None] = Setting(
    "system", str, None, "The member's own system prompt.", "member", yaml=True)
CHAT_TEMPLATE: Setting[str | None] = Setting(
    "chat_template", str, None,
    "The member's chat template, instead of its file's: a built-in's name (chatml, gemma, llama3, plain, zephyr) "
    "or Jinja text.", "member", yaml=True, default_text="the file's (none: chatml)")
"""The built-ins are :data:`me_local.chat_templates.BUILTINS` (a test keeps the help's list in step)."""
N_GPU_LAYERS: Setting[int] = Setting(
    "n_gpu_layers", int, 0, "Layers offloaded to the GPU: 0 none, -1 all (CUDA/Metal builds).", "member",
    lo=-1, yaml=True)
N_THREADS: Setting[int | None] = Setting(
    "n_threads", int, None, "Threads per decode.", "member", lo=1, yaml=True,
    default_text="the CPUs available (at most 8)")
REPACK: Setting[str] = Setting(
    "repack", str, "auto", "llama.cpp's weight repacking for faster CPU kernels; auto: off on CPUs with AMX.",
    "member", choices=("auto", "on", "off"), yaml=True)
MMAP: Setting[bool] = Setting(
    "mmap", bool, False, "Map the file instead of reading the weights into memory.", "member", yaml=True)

# --------------------------------------------------------------------------- server

PORT: Setting[int] = Setting(
    "port", int, 11435, "Port `serve` listens on (0: any free port, printed at start-up); `service` passes it on.",
    "server",
    lo=0, hi=65535, flag="--port")
"""The default is one above Ollama's 11434, so both daemons can run side by side.
``me-local service --port`` passes it on to ``serve``."""
HOST: Setting[str] = Setting(
    "host", str, "127.0.0.1", "Address to listen on. Anything but loopback needs --api-key (or --insecure).",
    "server", flag="--host")
MAX_BODY_SIZE: Setting[int] = Setting(
    "max_body_size", int, 8 << 20, "Largest request body in bytes.", "server", lo=1024, flag="--max-body-size")
"""``ServerSettings.max_body_bytes``; a larger body is answered 413."""

_SECONDS = (0.1, 3600.0)
"""Bounds of the header, body and write timeouts, in seconds."""

HEADER_TIMEOUT: Setting[float] = Setting(
    "header_timeout", float, 15.0,
    "Seconds a connection may take to send complete request headers (also the idle keep-alive limit); "
    "then it is closed.", "server", lo=_SECONDS[0], hi=_SECONDS[1], flag="--header-timeout")
BODY_TIMEOUT: Setting[float] = Setting(
    "body_timeout", float, 60.0,
    "Seconds a request body may take to arrive; then 408 and the connection is closed.", "server",
    lo=_SECONDS[0], hi=_SECONDS[1], flag="--body-timeout")
WRITE_TIMEOUT: Setting[float] = Setting(
    "write_timeout", float, 30.0,
    "Seconds a stream may wait for its client to read; then its generation is cancelled and the connection "
    "closed.", "server", lo=_SECONDS[0], hi=_SECONDS[1], flag="--write-timeout")


SETTINGS: tuple[Setting[Any], ...] = (
    TEMPERATURE, TOP_P, TOP_K, MIN_P, MAX_TOKENS, SEED, STOP, TOP_LOGPROBS,
    REPEAT_PENALTY, REPEAT_LAST_N, FREQUENCY_PENALTY, PRESENCE_PENALTY, LOGIT_BIAS,
    MODE, GRANULARITY, MEMBER, N_CTX, MAX_CTX, PARALLEL, MAX_QUEUE, N_BATCH, KV_CACHE_TYPE,
    WEIGHT, SYSTEM, CHAT_TEMPLATE, N_GPU_LAYERS, N_THREADS, REPACK, MMAP,
    HOST, PORT, MAX_BODY_SIZE, HEADER_TIMEOUT, BODY_TIMEOUT, WRITE_TIMEOUT,
)
"""Every setting, in the order the reference lists them."""

MODES = MODE.choices
GRANULARITIES = GRANULARITY.choices

SAMPLING_DEFAULTS: tuple[Setting[Any], ...] = tuple(s for s in SETTINGS if s.group == "sampling" and s.yaml)
"""The sampling settings an ensemble gives defaults for (its ``sampling:`` block)."""

CHAT_SETTINGS: dict[str, Setting[Any]] = {s.chat: s for s in SETTINGS if s.chat is not None}
"""What chat's ``/set`` takes, by the name it takes it under."""


def yaml_keys(group: Group) -> set[str]:
    """The models.yaml keys of a group's settings."""
    return {s.name for s in SETTINGS if s.group == group and s.yaml}
