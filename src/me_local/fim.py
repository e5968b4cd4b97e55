"""Fill-in-the-middle (FIM) prompts, built from a vocabulary's FIM tokens.

A code model trained for FIM (Qwen2.5-Coder, StarCoder2, CodeLlama...) has tokens that mark
the text before the cursor (``<|fim_prefix|>``), the text after it (``<|fim_suffix|>``) and
where the model writes the missing middle (``<|fim_middle|>``), and some have tokens for a
repository's name and file boundaries (``<|repo_name|>``, ``<|file_sep|>``). llama.cpp reads
them from the GGUF (``tokenizer.ggml.fim_*_token_id``, or known token texts) and exposes them
as ``llama_vocab_fim_pre/suf/mid/pad/rep/sep``: :class:`FimTokens`.

:func:`fim_prompt` builds one model's prompt from a :class:`FimInput`, in PSM order (prefix,
suffix, middle), the order llama-server's ``/infill`` and Ollama's FIM templates use:

* ``layout="plain"`` (``suffix`` on ``/api/generate`` and ``/v1/completions``, as Ollama's
  templates: ``<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>``)::

      [BOS] <PRE> prefix <SUF> suffix <MID>

* ``layout="repo"`` (``/infill``, as llama-server's ``format_prompt_infill``): the extra
  context first, in the repository-level pattern when the model has ``rep``/``sep`` tokens::

      <REP>myproject\\n <SEP>{filename}\\n{text} ... <SEP>filename\\n [BOS] <PRE> prefix prompt <SUF> suffix <MID>

  and otherwise each chunk after a ``\\n\\n--- snippet ---\\n\\n`` separator. llama-server puts
  its request's ``prompt`` (the text before the cursor on the cursor's line, as llama.vim
  sends it) right after the prefix, before ``<SUF>``, and so does this: its README's "added
  after the FIM_MID token" is not what its code does.

Every text is tokenized as text: control-token text inside the code (``<|fim_middle|>`` in a
file about FIM) stays characters, never markup. Nothing here imports a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .errors import ContextOverflowError

FIM_NAMES = ("pre", "suf", "mid", "pad", "rep", "sep")
"""The FIM tokens llama.cpp knows, as ``llama_vocab_fim_<name>`` names them."""

FIM_BATCH = 2048
"""llama-server's default ``n_batch``: what ``/infill`` gives the prefix, the prompt and the suffix
together (3/4 of it at most to the prefix, 1/4 to the prompt and the suffix), at most."""

REPO_NAME = "myproject\n"
"""The repository name llama-server writes after ``<REP>`` (it takes no name from the request)."""
CURRENT_FILE = "filename\n"
"""The file name llama-server writes for the file being completed."""
DEFAULT_FILENAME = "tmp"
"""An ``input_extra`` chunk's file name when it gives none (llama-server's default)."""
SNIPPET = "\n\n--- snippet ---\n\n"
"""What separates extra chunks for a model without ``<SEP>``."""


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens (-1: it has none)."""

    pre: int = -1
    suf: int = -1
    mid: int = -1
    pad: int = -1
    rep: int = -1
    sep: int = -1

    @property
    def capable(self) -> bool:
        """It has the three tokens a FIM prompt needs: prefix, suffix and middle."""
        return self.pre >= 0 and self.suf >= 0 and self.mid >= 0

    @property
    def missing(self) -> tuple[str, ...]:
        """Which of the three it lacks, in words."""
        return tuple(word for word, t in (("prefix", self.pre), ("suffix", self.suf), ("middle", self.mid))
                     if t < 0)


@dataclass(frozen=True)
class FimChunk:
    """Extra context for ``/infill``: the text of another file (or part of one)."""

    text: str
    filename: str = DEFAULT_FILENAME


@dataclass(frozen=True)
class FimInput:
    """What a fill-in-the-middle request asks for: the text before and after the gap."""

    prefix: str
    suffix: str
    prompt: str = ""
    """llama-server's ``prompt``: more text before the gap, after ``prefix`` (its own tokenization)."""
    extra: tuple[FimChunk, ...] = ()
    layout: Literal["plain", "repo"] = "plain"
    """``plain``: Ollama's templates; ``repo``: llama-server's ``/infill`` (see the module)."""
    fit: bool = False
    """Cut the prefix (its start), the suffix (its end) and the extra context (its start) to fit the
    member's context, as llama-server's ``/infill`` does (and say what was cut: :class:`FimPrompt`);
    False: the prompt is used whole, and one that does not fit is refused."""
    param: str = "suffix"
    """The request field that asked for FIM, named in errors."""


@dataclass(frozen=True)
class FimPrompt:
    """One model's FIM prompt, and how much of each part it kept and dropped (in its own tokens)."""

    tokens: list[int]
    kept: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return any(self.dropped.values())


class FimModel(Protocol):
    """What :func:`fim_prompt` needs of a model (a :class:`~me_local.backends.types.ModelHandle` has it)."""

    @property
    def fim(self) -> FimTokens: ...

    @property
    def bos(self) -> int: ...

    @property
    def add_bos(self) -> bool: ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]: ...


def fim_prompt(model: FimModel, fim: FimInput, *, n_ctx: int, reserve: int) -> FimPrompt:
    """``model``'s prompt for ``fim`` (see the module for the layouts). With ``fim.fit`` the parts are
    cut so that the prompt leaves ``reserve`` tokens of the ``n_ctx``-token context for the answer:
    the prefix, the prompt and the suffix share up to :data:`FIM_BATCH` tokens (the prefix at most
    3/4, the prompt and the suffix 1/4, as llama-server), the extra context fills what is left, and
    each part loses the tokens farthest from the gap (the extra context its oldest). A ``prompt``
    that alone does not fit is a :class:`ContextOverflowError`."""
    t = model.fim
    if not t.capable:
        raise ValueError("fim_prompt needs a model with FIM prefix, suffix and middle tokens")

    def tok(text: str) -> list[int]:
        return model.tokenize(text, add_special=False, parse_special=False) if text else []

    prefix, suffix, prompt = tok(fim.prefix), tok(fim.suffix), tok(fim.prompt)
    extra: list[int] = []
    if fim.layout == "repo":
        if t.rep >= 0:
            extra += [t.rep, *tok(REPO_NAME)]
        for chunk in fim.extra:
            extra += [t.sep, *tok(chunk.filename + "\n")] if t.sep >= 0 else tok(SNIPPET)
            extra += tok(chunk.text)
        if t.sep >= 0:
            extra += [t.sep, *tok(CURRENT_FILE)]
    head = [model.bos] if model.add_bos and model.bos >= 0 else []
    n_pre, n_suf, n_extra = len(prefix), len(suffix), len(extra)
    if fim.fit:
        room = n_ctx - max(1, reserve) - len(head) - 3  # 3: <PRE> <SUF> <MID>
        local = min(FIM_BATCH, room)
        if len(prompt) > local:
            raise ContextOverflowError(
                f"`prompt` is {len(prompt)} tokens, and the context of {n_ctx} tokens has room for {max(0, local)} "
                f"beside the FIM markup and {max(1, reserve)} tokens of answer; shorten `prompt` (the text before "
                "the cursor belongs in `input_prefix`), lower `n_predict`, or raise n_ctx in models.yaml",
                param="prompt")
        n_pre = min(n_pre, 3 * (local // 4), local - len(prompt))
        n_suf = min(n_suf, max(0, local // 4 - len(prompt)), local - len(prompt) - n_pre)
        n_extra = min(n_extra, max(0, room - n_pre - len(prompt) - n_suf))
    tokens = [*extra[len(extra) - n_extra:], *head, t.pre, *prefix[len(prefix) - n_pre:], *prompt, t.suf,
              *suffix[:n_suf], t.mid]
    kept = {"prefix": n_pre, "prompt": len(prompt), "suffix": n_suf, "extra": n_extra}
    dropped = {"prefix": len(prefix) - n_pre, "suffix": len(suffix) - n_suf, "extra": len(extra) - n_extra}
    return FimPrompt(tokens, kept, dropped)


def lacking_fim(names: Sequence[tuple[str, str, FimTokens]]) -> str | None:
    """None when every ``(member, file name, tokens)`` can fill in the middle; otherwise the sentence
    that says which members cannot and what to use instead."""
    bad = [(name, file, tokens) for name, file, tokens in names if not tokens.capable]
    if not bad:
        return None
    who = ", ".join(f"{name!r} ({file}: no FIM {'/'.join(tokens.missing)} token)" for name, file, tokens in bad)
    members, lack = ("member", "lacks") if len(bad) == 1 else ("members", "lack")
    return (f"fill-in-the-middle needs models with FIM tokens, and {members} {who} {lack} them; use an "
            "ensemble (or ENSEMBLE/MEMBER) of FIM-capable models, such as code models trained for infilling "
            "(Qwen2.5-Coder, StarCoder2, CodeLlama)")
