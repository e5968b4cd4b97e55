#!/usr/bin/env python3
"""Fabricate tiny llama-architecture GGUF models with random weights for tests.

Nothing is downloaded: the weights come from a seeded NumPy generator and the
tokenizer is trained here on a small built-in English text; any UTF-8 text can be
tokenized with every vocabulary. Vocabularies ``a`` and ``b`` are byte-level BPE ("gpt2"
model, "gpt-2" pre-tokenizer, Qwen/SmolLM-style ChatML); ``s`` is SentencePiece-style
("llama" model, Gemma-3-style template and specials), see below.

Byte-level BPE layout (identical for every seed of a given ``vocab``):

* ids 0..255: the 256 byte tokens, in GPT-2 ``bytes_to_unicode`` order;
* then the merged tokens (multi-character pieces such as ``" the"``,
  ``" Hello"``), and for vocab ``"a"`` also ``"é"`` and ``"€"`` as whole tokens
  (plus the partial-UTF-8 intermediate of ``"€"``);
* last three ids: ``<|endoftext|>`` (BOS and EOS), ``<|im_start|>`` and
  ``<|im_end|>`` (EOT), all CONTROL tokens; llama.cpp treats ``<|endoftext|>``
  and ``<|im_end|>`` as end-of-generation. ``add_bos_token`` is false (as in
  Qwen-style ChatML models), so tokenizing never prepends BOS by itself.

SentencePiece layout (vocab ``s``, like Gemma 3: ``add_bos_token`` true,
``add_space_prefix`` false, so ``"a"`` tokenizes to the piece ``"a"``, not ``"▁a"``):

* ids 0..5: ``<pad>``, ``<eos>`` (EOS), ``<bos>`` (BOS), ``<unk>`` (UNK, an UNKNOWN
  token), ``<start_of_turn>``, ``<end_of_turn>`` (EOT); the others are CONTROL tokens.
  llama.cpp treats ``<eos>`` and ``<end_of_turn>`` as end-of-generation;
* ids 6, 7: ``"\n"`` and ``"\n\n"``, USER_DEFINED as in Gemma 3 (llama.cpp splits them
  out of the text before the SentencePiece merges);
* ids 8..263: the byte tokens ``<0x00>``..``<0xFF>`` (byte fallback for any character
  without a piece: "€", CJK, tabs);
* then the pieces: ``"▁"`` (U+2581, a space), the printable ASCII characters and
  ``"é"``, then the merged pieces learned from the text, score = -rank (earlier merges
  first), then ``"▁▁"``. A piece holds ``"▁"`` only at its start (or is all ``"▁"``), so
  text split before whitespace tokenizes as the whole text does. ``▁`` reads as a space
  in ``llama_token_to_piece``: word-initial pieces start with whitespace.

Fill-in-the-middle variants (``fim=True``, files ``tiny-{vocab}-fim-{seed}.gguf``; the tokens
above are unchanged, FIM tokens are added as CONTROL tokens after the last id, so these are
vocabularies of their own):

* ``a``/``b``: Qwen2.5-Coder's six, ``<|fim_prefix|>``, ``<|fim_middle|>``, ``<|fim_suffix|>``,
  ``<|fim_pad|>``, ``<|repo_name|>``, ``<|file_sep|>`` (GGUF keys
  ``tokenizer.ggml.fim_{pre,mid,suf,pad,rep,sep}_token_id``), so llama-server's repository-level
  pattern applies;
* ``s``: CodeLlama's three, ``<PRE>``, ``<SUF>``, ``<MID>`` (no repository or file tokens).

The output rows of the special tokens are zero, so their logits are 0 while the
ordinary tokens' logits spread over several units: greedy decoding runs on
instead of stopping at once (use a logit bias to force an end of generation).

CLI: ``python scripts/make_tiny_models.py OUTDIR [--seeds 1 2 3] [--vocab a] [--fim]``
writes ``OUTDIR/tiny-{vocab}-{seed}.gguf`` (``--vocab`` a, b or s; ``--fim``: ``tiny-{vocab}-fim-{seed}.gguf``).
"""

from __future__ import annotations

import argparse
import enum
import functools
import itertools
import os
import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from me_local.chat_templates import BUILTINS

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML Jinja chat template stored as ``tokenizer.chat_template``."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

GEMMA = BUILTINS["gemma"].text
"""me-local's built-in Gemma 3 template (system text joins the first user turn, ``assistant``
is ``model``, roles alternate), the ``tokenizer.chat_template`` of vocabulary ``s``."""

SPM_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
"""Vocabulary ``s``'s ids 0..5."""
SPM_NEWLINES = ("\n", "\n\n")
"""Vocabulary ``s``'s ids 6, 7: USER_DEFINED whitespace pieces, as in Gemma 3."""
SPM_SPACE = "\u2581"
"""SentencePiece's word marker "▁", a space in the token texts."""

FIM_TOKENS = {
    "bpe": {"pre": "<|fim_prefix|>", "mid": "<|fim_middle|>", "suf": "<|fim_suffix|>", "pad": "<|fim_pad|>",
            "rep": "<|repo_name|>", "sep": "<|file_sep|>"},
    "spm": {"pre": "<PRE>", "suf": "<SUF>", "mid": "<MID>"},
}
"""The FIM tokens of ``fim=True`` per vocabulary family, by llama.cpp's name for each (the GGUF key
``tokenizer.ggml.fim_{name}_token_id``), in the order they are appended."""

N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV, N_FF = 64, 2, 4, 2, 128
OUTPUT_STD = 0.3  # logits std ~ OUTPUT_STD * sqrt(N_EMBD) ~ 2.4: peaked, not one-hot

# Merges to learn per vocabulary flavour (at most: the built-in text runs out
# after 263, giving 527 tokens for "a" and 359 for "b"), and whether "é"/"€"
# are whole tokens.
_VOCABS: dict[str, tuple[int, bool]] = {
    "a": (300, True),
    "b": (100, False),
}

# Vocabulary "s": merges to learn (the text runs out after about 240).
_SPM_VOCABS: dict[str, int] = {"s": 200}

_CORPUS = """\
Hello world! Hello there, hello again. The quick brown fox jumps over the lazy
dog. This is a small test of the tokenizer, and it is working. We are testing
the thing that the other thing is doing, and then we are going to be reading,
writing, running and talking in the morning and in the evening. What is your
name? My name is the model. How are you doing today? I am fine, thank you.
The weather is nice and the world is big. Say hello to the world: Hello world.
There were three little things in the house, and they were all looking at the
window. She said that he would be coming to the station with his brother.
Numbers like 1, 2, 3, 10, 42 and 2024 appear in text. Don't, can't, won't, it's
and we'll are contractions. The answer to the question is in the book, which is
on the table next to the computer. Everything is going to be fine.
"""
_CORPUS_WEIGHTS = {" the": 20, " Hello": 10, " world": 10, "ing": 10, " and": 5}
_PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")
# Vocabulary "s" learns merges within letters, single digits, or punctuation runs, each
# with the space before it (as SentencePiece splits by script and digit): no piece
# crosses a word boundary.
_SPM_WORDS = re.compile(r" ?[^\W\d_]+| ?\d| ?[^\s\w]+")
_SPM_CORPUS_WEIGHTS = {" the": 20, "Hello": 10, " Hello": 10, " world": 10, "ing": 10, " and": 5}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_ENC = bytes_to_unicode()


def _encode(text: str) -> str:
    """Byte-encode ``text`` the way GPT-2 token texts are stored."""
    return "".join(_BYTE_ENC[b] for b in text.encode("utf-8"))


@functools.cache
def _train_merges(n_merges: int) -> tuple[tuple[str, str], ...]:
    """Learn ``n_merges`` BPE merges (deterministically) from the built-in text."""
    words: Counter[tuple[str, ...]] = Counter()
    for piece in _PRETOKENIZE.findall(_CORPUS):
        words[tuple(_encode(piece))] += 1
    for piece, weight in _CORPUS_WEIGHTS.items():
        words[tuple(_encode(piece))] += weight
    return tuple(_learn(words, n_merges))


def _learn(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Up to ``n_merges`` merges, most frequent pair first (ties: smallest pair)."""
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_vocab(vocab: str = "a") -> tuple[list[str], list[int], list[str]]:
    """Return ``(tokens, token_types, merges)`` for vocabulary flavour ``vocab``."""
    if vocab not in _VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; expected one of {sorted(_VOCABS)}")
    n_merges, multibyte = _VOCABS[vocab]
    pairs = list(_train_merges(n_merges))
    if multibyte:  # "é" = C3 A9, "€" = E2 82 AC (intermediate "âĤ" is partial UTF-8)
        for char in ("é", "€"):
            enc = _encode(char)
            pairs += [(enc[:i], enc[i]) for i in range(1, len(enc))]
    tokens = list(_BYTE_ENC.values())
    for left, right in pairs:
        if left + right not in tokens:
            tokens.append(left + right)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    tokens += SPECIAL_TOKENS
    types += [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    return tokens, types, [f"{left} {right}" for left, right in pairs]


@functools.cache
def _train_spm_merges(n_merges: int) -> tuple[tuple[str, str], ...]:
    """Learn ``n_merges`` merges of ``"▁"``-escaped words (:data:`_SPM_WORDS`)."""
    words: Counter[tuple[str, ...]] = Counter()
    for piece in _SPM_WORDS.findall(_CORPUS):
        words[tuple(piece.replace(" ", SPM_SPACE))] += 1
    for piece, weight in _SPM_CORPUS_WEIGHTS.items():
        words[tuple(piece.replace(" ", SPM_SPACE))] += weight
    return tuple(_learn(words, n_merges))


def build_spm_vocab(vocab: str = "s") -> tuple[list[str], list[int], list[float]]:
    """Return ``(tokens, token_types, scores)`` for SentencePiece-style flavour ``vocab``."""
    if vocab not in _SPM_VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; expected one of {sorted(_SPM_VOCABS)}")
    merged = [left + right for left, right in _train_spm_merges(_SPM_VOCABS[vocab])]
    chars = [SPM_SPACE] + [chr(c) for c in range(0x21, 0x7F)] + ["é"]
    pieces = list(dict.fromkeys(merged + [SPM_SPACE * 2]))
    normal = pieces + [c for c in chars if c not in pieces]  # merges first: their order is their score

    tokens = list(SPM_SPECIAL_TOKENS) + list(SPM_NEWLINES) + [f"<0x{b:02X}>" for b in range(256)]
    types = [int(gguf.TokenType.CONTROL)] * len(SPM_SPECIAL_TOKENS)
    types[SPM_SPECIAL_TOKENS.index("<unk>")] = int(gguf.TokenType.UNKNOWN)
    types += [int(gguf.TokenType.USER_DEFINED)] * len(SPM_NEWLINES) + [int(gguf.TokenType.BYTE)] * 256
    scores = [0.0] * len(tokens)
    tokens += normal
    types += [int(gguf.TokenType.NORMAL)] * len(normal)
    scores += [-float(rank) for rank in range(len(normal))]
    return tokens, types, scores


#: Default output-row scales ``(word-initial tokens, byte tokens)`` per vocabulary family.
#: With random weights the tokens sampled at temperature 1 follow the vocabulary's mix;
#: only 11% of ``s``'s pieces start a word, so its word-initial rows are scaled up (and
#: its byte rows down: fewer stray bytes), giving ~30% word-initial tokens (words of
#: ~3 tokens). ``a``/``b`` are left as they were (1.0: their weights are unchanged).
ROW_SCALES = {"bpe": (1.0, 1.0), "spm": (1.2, 0.5)}


def _row_scale(pieces: list[bytes], byte_ids: range, word: float, byte: float) -> np.ndarray:
    """Per-token output-row scale: ``word`` for tokens whose text starts with whitespace,
    ``byte`` for the single-byte tokens (whitespace bytes count as word-initial)."""
    scale = np.ones(len(pieces), dtype=np.float32)
    scale[list(byte_ids)] = byte
    scale[[i for i, p in enumerate(pieces) if p[:1].isspace()]] = word
    return scale


def _weights(seed: int, n_vocab: int, special: slice | list[int],
             row_scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Random llama weights; numpy shapes are (out_features, in_features). The output
    rows of the ``special`` ids are zero; ``row_scale`` scales each token's output row."""
    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD

    def mat(rows: int, cols: int, std: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    output = mat(n_vocab, N_EMBD, OUTPUT_STD)
    output[special] = 0.0  # special tokens: logit exactly 0
    if row_scale is not None:
        output *= row_scale[:, None]
    tensors = {"token_embd.weight": mat(n_vocab, N_EMBD, 1.0)}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        tensors |= {
            p + "attn_norm.weight": ones(N_EMBD),
            p + "attn_q.weight": mat(N_EMBD, N_EMBD, N_EMBD**-0.5),
            p + "attn_k.weight": mat(N_HEAD_KV * head_dim, N_EMBD, N_EMBD**-0.5),
            p + "attn_v.weight": mat(N_HEAD_KV * head_dim, N_EMBD, N_EMBD**-0.5),
            p + "attn_output.weight": mat(N_EMBD, N_EMBD, N_EMBD**-0.5),
            p + "ffn_norm.weight": ones(N_EMBD),
            p + "ffn_gate.weight": mat(N_FF, N_EMBD, N_EMBD**-0.5),
            p + "ffn_up.weight": mat(N_FF, N_EMBD, N_EMBD**-0.5),
            p + "ffn_down.weight": mat(N_EMBD, N_FF, N_FF**-0.5),
        }
    return tensors | {"output_norm.weight": ones(N_EMBD), "output.weight": output}


class _Default(enum.Enum):
    VOCAB = "the vocabulary's own"


VOCAB_DEFAULT = _Default.VOCAB
"""``build_tiny_model``'s default for settings that depend on the vocabulary family."""


def build_tiny_model(
    path: str | os.PathLike[str],
    seed: int,
    *,
    vocab: str = "a",
    n_ctx_train: int = 2048,
    chat_template: str | _Default | None = VOCAB_DEFAULT,
    eos_token: str | None = None,
    add_bos: bool | None = None,
    arch: str = "llama",
    word_row_scale: float | None = None,
    byte_row_scale: float | None = None,
    add_eos: bool = False,
    pooling_type: int | None = None,
    fim: bool = False,
) -> Path:
    """Write a tiny random-weight llama GGUF model to ``path`` and return it.

    ``seed`` only affects the weights; the tokenizer metadata depends on
    ``vocab`` (and ``eos_token``, as a base and an instruct variant differ) alone.
    By default vocabularies ``a``/``b`` get :data:`CHATML`, EOS ``<|endoftext|>`` and no
    BOS added; ``s`` gets :data:`GEMMA`, EOS ``<eos>`` and BOS added.
    ``chat_template=None`` omits ``tokenizer.chat_template``; ``add_bos=True`` makes
    tokenizing prepend BOS (as Llama-style vocabularies do). ``arch`` names the
    architecture (keys are written under it); only "llama" loads, another name makes
    a file llama.cpp refuses as an unknown architecture. ``word_row_scale`` and
    ``byte_row_scale`` scale the output rows of the word-initial tokens (text starting
    with whitespace) and of the single-byte tokens (default: :data:`ROW_SCALES`); above 1,
    more of those tokens are sampled. ``add_eos=True`` makes tokenizing append the EOS (as some
    embedding models do); ``pooling_type`` writes ``{arch}.pooling_type`` (llama.cpp's numbers:
    1 mean, 2 cls, 3 last, 4 rank), the pooling an embedding model declares. ``fim`` adds the
    family's :data:`FIM_TOKENS` after the last id (CONTROL tokens, zero output rows) and their GGUF keys.
    The file is written under a temporary name and renamed into place.
    """
    path = Path(path)
    spm = vocab in _SPM_VOCABS
    if spm:
        tokens, types, scores = build_spm_vocab(vocab)
        merges: list[str] = []
        special = slice(0, len(SPM_SPECIAL_TOKENS))
        bos, eot, unk = (tokens.index(t) for t in ("<bos>", "<end_of_turn>", "<unk>"))
        eos = tokens.index(eos_token or "<eos>")
        template = GEMMA if chat_template is VOCAB_DEFAULT else chat_template
        first_byte = types.index(int(gguf.TokenType.BYTE))
        byte_ids = range(first_byte, first_byte + 256)
        pieces = [bytes([i - first_byte]) if i in byte_ids else t.replace(SPM_SPACE, " ").encode()
                  for i, t in enumerate(tokens)]
        word, byte = ROW_SCALES["spm"]
    else:
        tokens, types, merges = build_vocab(vocab)
        bos = tokens.index("<|endoftext|>")
        eos = tokens.index(eos_token or "<|endoftext|>")
        eot = tokens.index("<|im_end|>")
        template = CHATML if chat_template is VOCAB_DEFAULT else chat_template
        special = slice(len(tokens) - len(SPECIAL_TOKENS), None)
        byte_ids = range(256)
        decode = {c: b for b, c in _BYTE_ENC.items()}
        pieces = [bytes(decode[ch] for ch in t) if ty == int(gguf.TokenType.NORMAL) else b""
                  for t, ty in zip(tokens, types, strict=True)]
        word, byte = ROW_SCALES["bpe"]
    special_ids = list(range(len(tokens)))[special]
    fim_ids: dict[str, int] = {}
    if fim:
        for name, text in FIM_TOKENS["spm" if spm else "bpe"].items():
            fim_ids[name] = len(tokens)
            special_ids.append(len(tokens))
            tokens.append(text)
            types.append(int(gguf.TokenType.CONTROL))
            if spm:
                scores.append(0.0)
            pieces.append(text.encode() if spm else b"")
    word = word if word_row_scale is None else word_row_scale
    byte = byte if byte_row_scale is None else byte_row_scale
    row_scale = None if word == byte == 1.0 else _row_scale(pieces, byte_ids, word, byte)
    weights = _weights(seed, len(tokens), special_ids if fim else special, row_scale)

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(f"tiny-{vocab}{'-fim' if fim else ''}-{seed}")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))

    if spm:
        writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece (SPM) tokenizer
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(unk)
        writer.add_pad_token_id(tokens.index("<pad>"))
        writer.add_add_space_prefix(False)  # as Gemma 3: "a" is the piece "a", not "▁a"
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # llama.cpp rejects "gpt2" here
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_eot_token_id(eot)
    writer.add_add_bos_token(spm if add_bos is None else add_bos)
    writer.add_add_eos_token(add_eos)
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))
    if template is not None:
        writer.add_chat_template(template)
    for name, token in fim_ids.items():
        writer.add_uint32(f"tokenizer.ggml.fim_{name}_token_id", token)

    for name, tensor in weights.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def build_default_set(outdir: str | os.PathLike[str]) -> dict[str, Path]:
    """Build the test-suite's standard models into ``outdir``.

    Keys and files:

    * ``"a1"``, ``"a2"``, ``"a3"``: ``tiny-a-{1,2,3}.gguf``, vocab ``a``, seeds
      1-3, ChatML template (same tokenizer, different weights);
    * ``"b1"``: ``tiny-b-1.gguf``, vocab ``b`` (different vocabulary), seed 1;
    * ``"a4_nochat"``: ``tiny-a-4-nochat.gguf``, vocab ``a``, seed 4, no
      ``tokenizer.chat_template`` key;
    * ``"s1"``, ``"s2"``: ``tiny-s-{1,2}.gguf``, vocab ``s`` (SentencePiece-style,
      Gemma-style template), seeds 1-2.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    models = {f"a{s}": build_tiny_model(out / f"tiny-a-{s}.gguf", s) for s in (1, 2, 3)}
    models["b1"] = build_tiny_model(out / "tiny-b-1.gguf", 1, vocab="b")
    models["a4_nochat"] = build_tiny_model(out / "tiny-a-4-nochat.gguf", 4, chat_template=None)
    models |= {f"s{s}": build_tiny_model(out / f"tiny-s-{s}.gguf", s, vocab="s") for s in (1, 2)}
    return models


def build_fim_set(outdir: str | os.PathLike[str]) -> dict[str, Path]:
    """Build the fill-in-the-middle models into ``outdir`` (the standard set is not touched):

    * ``"afim1"``, ``"afim2"``: ``tiny-a-fim-{1,2}.gguf``, vocab ``a`` with Qwen-style FIM tokens
      (repository and file tokens too), seeds 1-2 (one vocabulary);
    * ``"sfim1"``: ``tiny-s-fim-1.gguf``, vocab ``s`` with CodeLlama-style ``<PRE>``/``<SUF>``/``<MID>``.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    models = {f"afim{s}": build_tiny_model(out / f"tiny-a-fim-{s}.gguf", s, fim=True) for s in (1, 2)}
    models["sfim1"] = build_tiny_model(out / "tiny-s-fim-1.gguf", 1, vocab="s", fim=True)
    return models


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--vocab", choices=sorted(_VOCABS | _SPM_VOCABS), default="a")
    parser.add_argument("--n-ctx-train", type=int, default=2048)
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--fim", action="store_true", help="add fill-in-the-middle tokens")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        path = build_tiny_model(
            args.outdir / f"tiny-{args.vocab}{'-fim' if args.fim else ''}-{seed}.gguf",
            seed,
            vocab=args.vocab,
            n_ctx_train=args.n_ctx_train,
            chat_template=None if args.no_chat_template else VOCAB_DEFAULT,
            fim=args.fim,
        )
        print(path)


if __name__ == "__main__":
    main()
