"""A GGUF file loaded once (:class:`LoadedModel`): how it is loaded (:class:`LoadSettings`),
its vocabulary, pieces, special tokens and metadata, tokenizing, and chat prompts whose
message content stays text."""

from __future__ import annotations

import ctypes
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp as L

from ... import chat_templates
from ...chat_templates import ChatTemplate
from ...core.types import GrammarSpec
from ...errors import RequestError
from ...fim import FIM_NAMES, FimTokens
from ..cpu import cpu_flags, decide_repack
from ..gguf_check import read_gguf_header
from ..hugepages import load_with_huge_pages
from ..types import ChatMessage, ToolDefinitions
from . import chat_template
from ._lib import capture_errors, init_backend, load_failure, log

if TYPE_CHECKING:
    from .grammar import LlamaGrammar, PrefixIndex
    from .threads import CpuShare


WHITESPACE = (b" ", b"\n", b"\t", b"\r")
"""First bytes of the pieces that begin a word."""


def _meta_str(model: L.llama_model_p, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, ctypes.sizeof(buf))
    if n < 0:
        return None
    if n >= ctypes.sizeof(buf):  # long template: retry with the exact size
        buf = ctypes.create_string_buffer(n + 1)
        L.llama_model_meta_val_str(model, key.encode(), buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", "replace")


@dataclass(frozen=True)
class LoadSettings:
    """How a model file is loaded; members whose settings are equal share one load."""

    n_gpu_layers: int = 0
    repack: bool = True
    """llama_model_params.use_extra_bufts: let llama.cpp repack weights for its faster CPU kernels."""
    mmap: bool = False
    """Map the file (False: read the weights into memory, so the file may change under a running model)."""
    repack_reason: str = field(default="", compare=False)
    """Why ``repack`` is what it is (for the load-time log line)."""

    @classmethod
    def resolve(cls, repack: str = "auto", *, mmap: bool = False, n_gpu_layers: int = 0,
                flags: frozenset[str] | None = None) -> LoadSettings:
        """From a member's settings (repack auto | on | off) and this CPU's flags."""
        on, reason = decide_repack(repack, cpu_flags() if flags is None else flags)
        return cls(n_gpu_layers=n_gpu_layers, repack=on, mmap=mmap, repack_reason=reason)

    def apply(self, params: L.llama_model_params) -> None:
        """Set these on a llama_model_params."""
        params.n_gpu_layers = self.n_gpu_layers if self.n_gpu_layers >= 0 else 1_000_000
        params.use_extra_bufts = self.repack
        if self.mmap:
            params.load_mode = L.LLAMA_LOAD_MODE_MMAP
        else:
            # read every tensor now; lazy reading maps the file even without mmap
            params.load_mode = L.LLAMA_LOAD_MODE_NONE
            params.lazy_mode = L.LLAMA_LAZY_MODE_OFF

    def describe(self, name: str) -> str:
        weights = ("mapped from the file (mmap: true; replace it with mv, never in place)" if self.mmap
                   else "read into memory (mmap: false)")
        return f"repack {'on' if self.repack else 'off'} for {name}: {self.repack_reason}; weights {weights}"


class LoadedModel:
    """One GGUF file loaded once: weights, vocabulary, pieces and metadata."""

    def __init__(self, path: Path, load: LoadSettings | None = None, *, vocab_only: bool = False) -> None:
        init_backend()
        load = load or LoadSettings.resolve()
        self.path = path
        self.load = load
        self.n_gpu_layers = load.n_gpu_layers
        header = read_gguf_header(path)  # a damaged file gets its own message, before llama.cpp reads it
        params = L.llama_model_default_params()
        load.apply(params)
        params.vocab_only = vocab_only
        if not vocab_only:
            log.info("%s", load.describe(path.name))
        with capture_errors() as errors:  # 4 KiB pages made one read copy ~6% slower than another (hugepages.py)
            ptr = load_with_huge_pages(lambda: L.llama_model_load_from_file(str(path).encode(), params),
                                       read_weights=not vocab_only and not load.mmap)
        if not ptr:
            raise load_failure(path, header.architecture, errors)
        self.ptr: L.llama_model_p | None = ptr
        self.vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(ptr))
        # layer shapes are not read in a vocabulary-only load (llama.cpp aborts if asked)
        self.n_embd = 0 if vocab_only else int(L.llama_model_n_embd(ptr))
        self.n_head = 0 if vocab_only else int(L.llama_model_n_head(ptr))
        self.size_bytes = path.stat().st_size
        self.chat_template = _meta_str(ptr, "tokenizer.chat_template")
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.fim = FimTokens(**{name: int(getattr(L, f"llama_vocab_fim_{name}")(self.vocab)) for name in FIM_NAMES})
        """The fill-in-the-middle tokens llama.cpp found (GGUF keys ``tokenizer.ggml.fim_*_token_id``, or
        known token texts such as ``<|fim_prefix|>``)."""
        self._eog: npt.NDArray[np.bool_] = np.array(
            [bool(L.llama_vocab_is_eog(self.vocab, t)) for t in range(self.n_vocab)])
        self.pieces = [self._piece(t, special=False) for t in range(self.n_vocab)]
        texts: list[bytes] = [L.llama_vocab_get_text(self.vocab, t) or b"" for t in range(self.n_vocab)]
        # what llama.cpp's speculative decoding checks between draft and target: vocabulary
        # type, size, BOS/EOS and every token's text
        h = hashlib.sha256()
        h.update(f"{L.llama_vocab_type(self.vocab)}:{self.n_vocab}:".encode())
        h.update(f"{L.llama_vocab_bos(self.vocab)}:{L.llama_vocab_eos(self.vocab)}:".encode())
        for t in texts:
            h.update(t + b"\x00")
        self.token_texts = texts
        self.fingerprint = h.hexdigest()
        self.word_start: npt.NDArray[np.bool_] = self._eog | np.array(
            [p[:1] in WHITESPACE for p in self.pieces], dtype=bool)
        """Tokens that may begin a word in word-level ME: whitespace-initial, or end of generation."""
        self._word_start_bias: ctypes.Array[L.llama_logit_bias] | None = None
        self.bos_text = self._piece(self.bos, special=True).decode("utf-8", "replace") if self.bos >= 0 else ""
        self.eos_text = self._piece(self.eos, special=True).decode("utf-8", "replace") if self.eos >= 0 else ""
        self.refs = 0
        self.store_key: tuple[str, LoadSettings] | None = None
        """Set by the ModelStore that shares this model: its key there."""
        self.cpu: CpuShare | None = None
        """Set by the ModelStore that shares this model: the CPU threads its contexts share."""

    def _piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    @property
    def eog(self) -> npt.NDArray[np.bool_]:
        """Per token id: whether it ends a generation (EOS, end of turn...)."""
        return self._eog

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        arr = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_special, parse_special)
        if n < 0:
            arr = (L.llama_token * -n)()
            n = L.llama_tokenize(self.vocab, data, len(data), arr, -n, add_special, parse_special)
        if n < 0:
            raise RequestError("the prompt could not be tokenized", param="prompt")
        return list(arr[:n])

    def tokenize_text(self, text: str) -> list[int]:
        """Generated text as a continuation: no BOS, markup kept as text, and no space put
        before it (a SentencePiece vocabulary that adds a space prefix gets its leading space
        from the text itself, when the text has one)."""
        if self._adds_space_prefix is None:
            probe = self.tokenize("a", add_special=False, parse_special=False)
            self._adds_space_prefix = self.detokenize(probe) != "a"
        if self._adds_space_prefix and text.startswith(" "):
            text = text[1:]
        return self.tokenize(text, add_special=False, parse_special=False) if text else []

    _adds_space_prefix: bool | None = None

    def word_start_bias(self) -> ctypes.Array[L.llama_logit_bias]:
        """-inf for every token that may not begin a word (built once): llama.cpp's logit-bias
        sampler restricts a chain to :attr:`word_start`."""
        if self._word_start_bias is None:
            banned = np.nonzero(~self.word_start)[0]
            arr = np.zeros(len(banned), dtype=[("token", "<i4"), ("bias", "<f4")])
            arr["token"] = banned
            arr["bias"] = -np.inf
            self._word_start_bias = (L.llama_logit_bias * len(banned)).from_buffer_copy(arr.tobytes())
        return self._word_start_bias

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.pieces[t] for t in tokens).decode("utf-8", "replace")

    # -- grammars ------------------------------------------------------------------
    _grammar_banned: npt.NDArray[np.bool_] | None = None
    _byte_tokens: dict[int, int] | None = None

    @property
    def grammar_banned(self) -> npt.NDArray[np.bool_]:
        """Per token id: not end-of-generation, and its text as a grammar reads it (llama.cpp
        renders pieces with special tokens as their text: ``<|im_start|>``, ``<pad>``) differs
        from the text me-local writes for it (nothing, for a control token). Such tokens are
        never drawn under a grammar, or the output would differ from what the grammar matched
        (built once: a piece per token)."""
        if self._grammar_banned is None:
            banned = np.zeros(self.n_vocab, dtype=bool)
            for t in range(self.n_vocab):
                if not self._eog[t] and self._piece(t, special=True) != self.pieces[t]:
                    banned[t] = True
            self._grammar_banned = banned
        return self._grammar_banned

    _grammar_index: PrefixIndex | None = None

    @property
    def grammar_index(self) -> PrefixIndex:
        """The tokens by their first bytes, for grammar masks (built once)."""
        if self._grammar_index is None:
            from .grammar import PrefixIndex

            self._grammar_index = PrefixIndex(self)
        return self._grammar_index

    def byte_token(self, byte: int) -> int | None:
        """A token whose text is exactly the byte ``byte`` (None: the vocabulary has none)."""
        if self._byte_tokens is None:
            banned = self.grammar_banned
            table: dict[int, int] = {}
            for t, p in enumerate(self.pieces):
                if len(p) == 1 and p[0] not in table and not banned[t] and not self._eog[t]:
                    table[p[0]] = t
            self._byte_tokens = table
        return self._byte_tokens.get(byte)

    def spell(self, data: bytes) -> list[int] | None:
        """Tokens whose texts concatenate to exactly ``data`` (to advance a grammar over text
        another member wrote): this vocabulary's own tokenization of the text when it spells
        the bytes exactly (and uses no banned token), else one token per byte. None when a
        byte has no token of its own."""
        banned = self.grammar_banned
        rest = data
        out: list[int] = []
        head = data[: len(data) - _incomplete_tail(data)]
        try:
            text = head.decode("utf-8") if head else None
        except UnicodeDecodeError:
            text = None
        if text is not None:
            tokens = self.tokenize_text(text)
            if b"".join(self.pieces[t] for t in tokens) == head and not any(banned[t] for t in tokens):
                out, rest = tokens, data[len(head):]
        for b in rest:
            t = self.byte_token(b)
            if t is None:
                return None
            out.append(t)
        return out

    def template(self, configured: str | None = None) -> ChatTemplate:
        """The chat template of a member whose models.yaml ``chat_template`` is ``configured``
        (None: this file's own, or the default when it has none), and where it came from."""
        return chat_templates.choose(configured, self.chat_template)

    def format_chat(self, messages: Sequence[ChatMessage], template: ChatTemplate | None = None,
                    tools: ToolDefinitions | None = None) -> str:
        """``messages`` rendered by ``template`` (default: :meth:`template`), which receives ``tools``."""
        t = template or self.template()
        return chat_template.render(t.text, messages, eos_text=self.eos_text, bos_text=self.bos_text,
                                    who=t.named_for(self.path.name), tools=tools)

    def chat_tokens(self, messages: Sequence[ChatMessage], labels: Sequence[str] | None = None,
                    template: ChatTemplate | None = None, tools: ToolDefinitions | None = None) -> list[int]:
        """The prompt for chat messages, rendered by ``template`` (default: :meth:`template`), which
        receives ``tools``. Only the template's own markup may produce special tokens: text in a
        message's content that reads as a control token (``<|im_end|>``) is tokenized as plain
        text, so a user cannot forge turns. What the template renders as markup besides the
        content (tool definitions, an assistant's calls, a result's call id and name) cannot be
        kept apart that way, so control-token text there is refused. ``labels`` name the
        messages in errors (default ``messages[i]``)."""
        template = template or self.template()
        self._refuse_markup(messages, labels, tools)
        marked = {}
        for i, m in enumerate(messages):
            found = self._control_texts(m.get("content") or "")
            if found is not None:
                marked[i] = found
        if not marked:  # nothing at stake: the rendered text as one piece, exactly as always
            text = self.format_chat(messages, template, tools)
            starts_with_bos = bool(self.bos_text) and text.startswith(self.bos_text)
            return self.tokenize(text, add_special=self.add_bos and not starts_with_bos)
        return self._chat_tokens_with_text_content(messages, marked, labels, template, tools)

    def _refuse_markup(self, messages: Sequence[ChatMessage], labels: Sequence[str] | None,
                       tools: ToolDefinitions | None) -> None:
        """A RequestError naming the first string of the tools, or of a message besides its role and
        content, that holds control-token text of this vocabulary."""
        places: list[tuple[str, str, Any]] = [("tools", f"tools[{i}]", t) for i, t in enumerate(tools or ())]
        for i, m in enumerate(messages):
            label = labels[i] if labels is not None else f"messages[{i}]"
            places += [("messages", f"{label}.{k}", v) for k, v in m.items() if k not in ("role", "content")]
        for param, path, value in places:
            stack = [(path, value)]
            while stack:
                where, v = stack.pop()
                if isinstance(v, dict):
                    for k, item in v.items():
                        stack.append((f"{where}.{k}", item))
                        stack.append((f"a key of {where}", str(k)))
                elif isinstance(v, (list, tuple)):
                    stack += [(f"{where}[{j}]", item) for j, item in enumerate(v)]
                elif isinstance(v, str):
                    found = self._control_texts(v)
                    if found is not None:
                        raise RequestError(
                            f"{where} contains {', '.join(found) or 'control-token text'}, which is markup for "
                            f"{self.path.name}; its chat template writes this field as markup, not as text: "
                            "remove it", param=param)

    _control_pattern: re.Pattern[str] | None = None

    def _control_texts(self, text: str) -> list[str] | None:
        """None when ``text`` tokenizes the same with and without special-token parsing;
        otherwise the control-token texts it contains."""
        if self._control_pattern is None:
            # the texts that parse_special adds to the split: control and unknown tokens
            kinds = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
            texts = {self.token_texts[t].decode("utf-8", "replace") for t in range(self.n_vocab)
                     if L.llama_vocab_get_attr(self.vocab, t) & kinds}
            alternatives = sorted((re.escape(t) for t in texts if t), key=len, reverse=True)
            self._control_pattern = re.compile("|".join(alternatives) or "(?!)")
        if not text or not self._control_pattern.search(text):  # a quick scan, then the exact test
            return None
        special = self.tokenize(text, add_special=False, parse_special=True)
        if special == self.tokenize(text, add_special=False, parse_special=False):
            return None
        kinds = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
        found = [self._piece(t, special=True).decode("utf-8", "replace") for t in special
                 if L.llama_vocab_get_attr(self.vocab, t) & kinds]
        return list(dict.fromkeys(found))

    def _chat_tokens_with_text_content(self, messages: Sequence[ChatMessage], marked: dict[int, list[str]],
                                       labels: Sequence[str] | None, template: ChatTemplate,
                                       tools: ToolDefinitions | None = None) -> list[int]:
        """Tokenize the template's pieces with special-token parsing and the contents
        without (:func:`chat_template.split_at_contents`). The pieces' boundaries may
        tokenize a little differently from one whole text, so this path is taken only when
        it is needed."""

        def refuse(i: int) -> RequestError:
            label = labels[i] if labels is not None else f"messages[{i}]"
            found = ", ".join(marked[i]) or "control-token text"
            return RequestError(
                f"{label} contains {found}, which is markup for {self.path.name}; its chat template "
                "rewrites message content, so that text cannot be kept as plain text: remove it from the message",
                param="messages",
            )

        pieces = chat_template.split_at_contents(lambda msgs: self.format_chat(msgs, template, tools), messages,
                                                 marked, refuse)
        # BOS as for the whole text: added unless the template's text starts with it
        starts_with_bos = bool(self.bos_text) and pieces[0][0].startswith(self.bos_text)
        tokens = [self.bos] if self.add_bos and self.bos >= 0 and not starts_with_bos else []
        for piece, is_content in pieces:
            if piece:
                tokens += self.tokenize(piece, add_special=False, parse_special=not is_content)
        return tokens

    def make_grammar(self, spec: GrammarSpec, member: str) -> LlamaGrammar:
        """A fresh grammar state for ``spec`` over this vocabulary (RequestError when llama.cpp
        cannot use it)."""
        from .grammar import LlamaGrammar

        return LlamaGrammar(self, spec, member)

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None


def _incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` begin a UTF-8 character that is not complete."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return 0
        if b >= 0xC0:  # a lead byte
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return back if back < need else 0
    return 0


def inspect_model(path: Path) -> LoadedModel:
    """Vocabulary and metadata only (no weights): for `me-local models` and validation."""
    model = LoadedModel(path, LoadSettings(repack=False, mmap=False), vocab_only=True)
    model.close()
    return model
