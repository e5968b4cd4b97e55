"""The backend seam: what the engine needs of a backend, as typed protocols.

The core sees a member through :class:`me_local.core.types.Member` (evaluate, logits,
sampler, cache). The engine needs a little more, and only this:

- :class:`ModelHandle`, a loaded model file: its vocabulary (size, special tokens, its
  fill-in-the-middle tokens, the fingerprint that says whether two files share one),
  tokenizing and the chat template;
- :class:`MemberContext`, one member in one slot: the core's Member (which can also score
  a text: :class:`me_local.core.scoring.ScoringMember`, logits at every position in
  chunks, and its word-start and end-of-generation tokens, and constrain its output to a
  grammar: ``make_constraint``), plus its model, its prompts (its own system prompt and chat
  template), ``resize()`` (a request asked for a larger context) and ``close()``, which frees
  the context and gives back the member's hold on its model;
- :class:`MemberFactory`, which makes a member context from a member's configuration.
  The context it returns is owned by the caller: closing it releases everything the
  factory took for it.
- :class:`Embedder`, a member's embedding context (a context of its own over the member's
  model, apart from the slots), which a factory that can embed (:class:`EmbedderFactory`)
  makes; owned by the caller as a member context is.

``me_local.backends.llama`` implements them with llama.cpp; tests implement them with
fakes (tests/fakes.py). Nothing here imports a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..chat_templates import ChatTemplate
from ..core.likelihood import TextMember
from ..core.types import Constraint, GrammarSpec
from ..fim import FimTokens

if TYPE_CHECKING:
    from ..config import EnsembleConfig, MemberConfig

ChatMessage = Mapping[str, Any]
"""One chat message as the backends render it: ``role`` and ``content``, and an assistant's
``tool_calls`` or a tool result's ``tool_call_id`` and ``name`` (already validated by
:func:`me_local.engine.normalize_messages`)."""

ToolDefinitions = Sequence[Mapping[str, Any]]
"""The ``tools`` a chat template receives: OpenAI's list, ``{"type": "function", "function": {name,
description, parameters}}`` each (as llama.cpp and Ollama pass them)."""


class ModelHandle(Protocol):
    """A loaded model file, shared by the member contexts over it."""

    @property
    def path(self) -> Path: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_ctx_train(self) -> int:
        """The context the model was trained with (GGUF ``<arch>.context_length``; 0: unknown)."""
        ...

    @property
    def weights_bytes(self) -> int:
        """The memory its weights take, shared by every context over it."""
        ...

    @property
    def offloaded(self) -> float:
        """The share of its layers (their weights and KV cache) on a GPU: 0 on a CPU build."""
        ...

    @property
    def bos(self) -> int:
        """The beginning-of-sequence token (-1: none)."""
        ...

    @property
    def eos(self) -> int:
        """The end-of-sequence token (-1: none)."""
        ...

    @property
    def add_bos(self) -> bool:
        """Whether tokenizing a prompt puts BOS before it (the vocabulary's ``add_bos_token``)."""
        ...

    @property
    def fim(self) -> FimTokens:
        """The fill-in-the-middle tokens (``llama_vocab_fim_pre/suf/mid/pad/rep/sep``; -1 where none)."""
        ...

    @property
    def bos_text(self) -> str: ...

    @property
    def eos_text(self) -> str: ...

    @property
    def fingerprint(self) -> str:
        """Equal for two files exactly when they share a vocabulary (type, size, BOS/EOS and
        every token's text): members of one ensemble must."""
        ...

    @property
    def token_texts(self) -> Sequence[bytes]:
        """Every token's text, by id (to say where two vocabularies differ)."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The file's own chat template (None: it has none, and a default is used)."""
        ...

    def template(self, configured: str | None = None) -> ChatTemplate:
        """The template a member whose models.yaml ``chat_template`` is ``configured`` renders
        with (None: the file's own, or the default), and where it came from."""
        ...

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, end of turn...)."""
        ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def chat_tokens(self, messages: Sequence[ChatMessage], labels: Sequence[str] | None = None,
                    template: ChatTemplate | None = None, tools: ToolDefinitions | None = None) -> list[int]:
        """The prompt ``template`` (default: :meth:`template`) makes of ``messages`` (and ``tools``,
        which the template receives), with message content tokenized as text (never as control
        tokens); text the template renders as markup (tool definitions, calls) that holds
        control-token text is refused. ``labels`` name the messages in errors."""
        ...


class MemberContext(TextMember, Protocol):
    """One member in one slot: the core's :class:`Member` over a model (a
    :class:`~me_local.core.likelihood.TextMember`: it can score text too, and tokenize text as a
    continuation), with its prompts."""

    @property
    def model(self) -> ModelHandle: ...

    @property
    def system(self) -> str | None:
        """The member's own system prompt (put before the messages by :meth:`chat_prompt`)."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The member's models.yaml ``chat_template`` (a built-in's name or Jinja text), used
        instead of its file's; None: the file's own (or the default when it has none)."""
        ...

    def chat_prompt(self, messages: Sequence[ChatMessage], *, tools: ToolDefinitions | None = None,
                    labels: Sequence[str] | None = None) -> list[int]:
        """The prompt for chat messages: this member's system prompt first, its own template
        (which receives ``tools`` when given). ``labels`` name the messages in errors
        (default ``messages[i]``)."""
        ...

    def raw_prompt(self, text: str) -> list[int]:
        """The prompt for a raw text, tokenized as written (markup included)."""
        ...

    def make_constraint(self, spec: GrammarSpec) -> Constraint:
        """A fresh grammar state for ``spec`` over this member's vocabulary (the core's
        :class:`~me_local.core.types.GrammarMember`): a RequestError naming ``spec.param`` when
        the grammar cannot be used (not valid GBNF)."""
        ...

    @property
    def memory_bytes(self) -> int:
        """The memory this member's context takes (its KV cache), besides its model's weights."""
        ...

    def resize(self, n_ctx: int) -> None:
        """Give the member a context of ``n_ctx`` tokens (a new one: its cache starts empty).
        Raises :class:`~me_local.errors.ModelLoadError` when there is not the memory for it; the
        member then keeps the context it had."""
        ...

    def close(self) -> None:
        """Free the context and release the member's hold on its model. Idempotent."""
        ...


class MemberFactory(Protocol):
    """Makes the member context for one member of an ensemble (one per slot)."""

    def __call__(self, member: MemberConfig, ensemble: EnsembleConfig, /) -> MemberContext: ...


class Embedder(Protocol):
    """A member's embedding context: the token vectors of its model's last layer, pooled as its
    file declares (:mod:`me_local.core.embedding`), for inputs of at most :attr:`n_ctx` tokens."""

    @property
    def name(self) -> str: ...

    @property
    def n_embd(self) -> int:
        """The length of a vector."""
        ...

    @property
    def n_ctx(self) -> int:
        """The most tokens an input may have."""
        ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def memory_bytes(self) -> int:
        """The memory its context takes (its KV cache), for ``/api/ps``."""
        ...

    @property
    def pooling(self) -> str:
        """mean, cls or last."""
        ...

    @property
    def adds_eos(self) -> bool:
        """Whether :meth:`tokenize` ends an input with the EOS (kept when an input is cut)."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """An input's tokens: the text as text, with the special tokens the model adds to one."""
        ...

    def embed(self, inputs: Sequence[Sequence[int]], cancel: Callable[[], bool] | None = None
              ) -> npt.NDArray[np.float64]:
        """Each input's pooled vector (not normalised): one row per input. ``cancel`` is checked
        between decodes (:class:`~me_local.core.types.Cancelled`)."""
        ...

    def close(self) -> None:
        """Free the context and release the hold on its model. Idempotent."""
        ...


@runtime_checkable
class EmbedderFactory(Protocol):
    """A member factory that can also make a member's embedding context."""

    def embedder(self, member: MemberConfig, ensemble: EnsembleConfig, /) -> Embedder: ...
