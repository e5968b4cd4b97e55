"""Checks that the fabricated tiny GGUF models (scripts/make_tiny_models.py) work in llama.cpp."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_models.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


mtm = _load_script()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return mtm.build_default_set(tmp_path_factory.mktemp("tiny"))


def _llama(path: Path, **kwargs: Any) -> Any:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, **kwargs)


def _next_token_logits(llm: Any, prompt: bytes) -> np.ndarray:
    # Needs logits_all=True: llama-cpp-python 0.3.36 only fills `scores` then.
    tokens = llm.tokenize(prompt, add_bos=False, special=True)
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)


def _tokenizer_fields(path: Path) -> dict[str, bytes]:
    reader = gguf.GGUFReader(path)
    return {
        name: b"".join(part.tobytes() for part in field.parts)
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.ggml.")
    }


def test_tokenizer_round_trip_and_partial_utf8(models: dict[str, Path]) -> None:
    llm = _llama(models["a1"], vocab_only=True)
    text = "Hello world é€ naïve ünïcödé 漢字 🙂\n\tthe thing"
    tokens = llm.tokenize(text.encode(), add_bos=False)
    assert llm.detokenize(tokens).decode() == text
    assert len(tokens) < len(text.encode())  # merges produce multi-byte tokens
    pieces = [llm.detokenize([t]) for t in llm.tokenize(b"Hello world \xc3\xa9\xe2\x82\xac", add_bos=False)]
    assert pieces == [b"Hello", b" world", b" ", "é".encode(), "€".encode()]
    # Ids 0..255 are the single bytes (so a random model can emit partial UTF-8 such as b"\xc3").
    assert [llm.detokenize([i]) for i in range(256)] == [bytes([b]) for b in mtm.bytes_to_unicode()]
    all_pieces = {llm.detokenize([i]) for i in range(llm.n_vocab())}
    assert b"\xe2\x82" in all_pieces  # intermediate merge on the way to "€": 2 of its 3 bytes


def test_special_tokens_are_control_and_eog(models: dict[str, Path]) -> None:
    llm = _llama(models["a1"], vocab_only=True)
    n_vocab = llm.n_vocab()
    special_ids = {tok: llm.tokenize(tok.encode(), add_bos=False, special=True) for tok in mtm.SPECIAL_TOKENS}
    assert special_ids == {tok: [n_vocab - 3 + i] for i, tok in enumerate(mtm.SPECIAL_TOKENS)}
    assert llm.token_bos() == llm.token_eos() == n_vocab - 3
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, n_vocab - 3)  # <|endoftext|>
    assert llama_cpp.llama_vocab_is_eog(vocab, n_vocab - 1)  # <|im_end|>
    assert not llama_cpp.llama_vocab_is_eog(vocab, n_vocab - 2)  # <|im_start|>
    assert llm.detokenize([n_vocab - 1]) == b""  # control tokens are not rendered by default


def test_vocabularies(models: dict[str, Path]) -> None:
    fields = {key: _tokenizer_fields(path) for key, path in models.items()}
    assert fields["a1"] == fields["a2"] == fields["a3"] == fields["a4_nochat"]
    assert fields["b1"] != fields["a1"]
    llms = {key: _llama(models[key], vocab_only=True) for key in ("a1", "b1")}
    sizes = {key: llm.n_vocab() for key, llm in llms.items()}
    assert sizes["a1"] != sizes["b1"]
    assert all(300 <= n <= 600 for n in sizes.values())
    text = "Hello world é€".encode()
    for llm in llms.values():
        assert llm.detokenize(llm.tokenize(text, add_bos=False)) == text
    assert llms["a1"].tokenize(text, add_bos=False) != llms["b1"].tokenize(text, add_bos=False)


def test_distinct_peaked_logits_across_seeds(models: dict[str, Path]) -> None:
    prompt = b"<|im_start|>user\nHello world<|im_end|>\n"
    logits = []
    for key in ("a1", "a2", "a3"):
        llm = _llama(models[key], logits_all=True)
        row = _next_token_logits(llm, prompt)
        assert np.all(np.isfinite(row))
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        assert 0.03 < probs.max() < 0.99  # neither uniform nor one-hot
        logits.append(row)
    for i in range(len(logits)):
        for j in range(i + 1, len(logits)):
            assert np.abs(logits[i] - logits[j]).max() > 1.0


def test_completion_and_chat_template(models: dict[str, Path]) -> None:
    llm = _llama(models["a1"])
    template = llm.metadata["tokenizer.chat_template"]
    assert template == mtm.CHATML
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    rendered = formatter(messages=[{"role": "user", "content": "Hi"}]).prompt
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    out = llm.create_completion("Hello world", max_tokens=24, temperature=0.0)
    assert out["choices"][0]["text"]
    tokens = llm.tokenize(b"Hello world", add_bos=False)
    generated = []
    for token in llm.generate(tokens, temp=0.0):
        generated.append(token)
        if len(generated) == 24:
            break
    assert len(set(generated)) >= 4  # greedy decoding is not stuck on one token

    assert "tokenizer.chat_template" not in _llama(models["a4_nochat"], vocab_only=True).metadata


# --- vocabulary "s": SentencePiece-style (llama.cpp's SPM tokenizer), Gemma-style markup ---

SPM_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5}

# Word boundaries: a whitespace run starts. Double spaces, newline runs, a tab, digits,
# punctuation, byte fallback ("€", CJK) and a piece of its own ("é").
PARAGRAPH = (
    "Hello world! The quick brown fox jumps over the lazy dog.  Two spaces,   three,\n"
    "a new line\n\nand a blank one, then\n\n\nthree. Numbers like 2024 and 42; don't stop.\n"
    "\tTabbed é and € and 漢字 text, (parentheses) and \"quotes\" - dash... Done.\n"
)


def _pieces(llm: Any, tokens: list[int], *, special: bool = False) -> list[bytes]:
    """llama_token_to_piece for each token (what me-local's LoadedModel.pieces holds)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for t in tokens:
        buf = (llama_cpp.ctypes.c_char * 64)()
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, special)
        out.append(bytes(buf[:n]))
    return out


def _tok(llm: Any, text: str) -> list[int]:
    return list(llm.tokenize(text.encode(), add_bos=False, special=False))


def test_spm_vocabulary_layout(models: dict[str, Path]) -> None:
    llm = _llama(models["s1"], vocab_only=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    assert llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
    assert n_vocab == len(mtm.build_spm_vocab("s")[0]) == 561
    assert (llm.token_bos(), llm.token_eos(), llama_cpp.llama_vocab_eot(vocab)) == (2, 1, 5)
    assert llm.metadata["tokenizer.ggml.unknown_token_id"] == "3"
    assert llm.metadata["tokenizer.ggml.add_space_prefix"] == "false"
    assert llama_cpp.llama_vocab_get_add_bos(vocab)
    assert all(len(_tok(llm, t)) > 1 for t in SPM_IDS)  # as plain text, markup is not a token
    assert {t: list(llm.tokenize(t.encode(), add_bos=False, special=True)) for t in SPM_IDS} == {
        t: [i] for t, i in SPM_IDS.items()
    }
    # "\n", "\n\n": USER_DEFINED (ids 6, 7); ids 8..263: <0x00>..<0xFF>
    assert _tok(llm, "\n") == [6] and _tok(llm, "\n\n") == [7] and _tok(llm, "\n\n\n") == [7, 6]
    assert _pieces(llm, list(range(8, 264))) == [bytes([b]) for b in range(256)]
    assert [llm.detokenize([i]) for i in range(8, 264)] == [bytes([b]) for b in range(256)]
    # BOS is added when asked, no space is put before the text: "a" is the piece "a"
    assert _pieces(llm, _tok(llm, "a")) == [b"a"]
    assert llm.tokenize(b"a", add_bos=True) == [2, *_tok(llm, "a")]


def test_spm_round_trips_and_pieces(models: dict[str, Path]) -> None:
    llm = _llama(models["s1"], vocab_only=True)
    for text in ("Hello world", "é€", "漢字 and かな", "one\ntwo\n\nthree\n\n\n\tfour  five", PARAGRAPH):
        tokens = _tok(llm, text)
        assert llm.detokenize(tokens).decode() == text
        assert b"".join(_pieces(llm, tokens)) == text.encode()
    assert _pieces(llm, _tok(llm, "Hello world")) == [b"Hello", b" world"]
    assert _pieces(llm, _tok(llm, "  Hello")) == [b" ", b" Hello"]
    # "é" is a piece, "€" (E2 82 AC) and CJK fall back to byte tokens
    assert _pieces(llm, _tok(llm, " é€")) == [b" ", "é".encode(), b"\xe2", b"\x82", b"\xac"]
    assert _tok(llm, "漢") == [8 + b for b in "漢".encode()]
    # "▁" reads as a space: word-initial pieces are those that start with whitespace
    texts = [llama_cpp.llama_vocab_get_text(llama_cpp.llama_model_get_vocab(llm.model), t).decode()
             for t in range(llm.n_vocab())]
    pieces = _pieces(llm, list(range(llm.n_vocab())))
    marked = [t for t, text in enumerate(texts) if text.startswith("\u2581")]
    assert len(marked) > 50
    assert all(pieces[t].startswith(b" ") and b"\xe2\x96\x81" not in pieces[t] for t in marked)
    assert not any("\u2581" in text.lstrip("\u2581") for text in texts)  # "▁" only leads a piece
    word_initial = {t for t, p in enumerate(pieces) if p[:1].isspace()}
    assert word_initial == set(marked) | {6, 7} | {8 + b for b in b" \t\n\x0b\x0c\r"}


def test_spm_tokenizes_the_same_across_word_boundaries(models: dict[str, Path]) -> None:
    """The property word-level ME relies on: text split before each whitespace run
    tokenizes as the whole text does. Inside a run it does not where a whitespace piece
    ("▁▁", "\\n\\n") spans the split."""
    llm = _llama(models["s1"], vocab_only=True)
    whole = _tok(llm, PARAGRAPH)
    starts = [i for i in range(1, len(PARAGRAPH)) if PARAGRAPH[i].isspace() and not PARAGRAPH[i - 1].isspace()]
    assert len(starts) == 43
    assert [i for i in starts if _tok(llm, PARAGRAPH[:i]) + _tok(llm, PARAGRAPH[i:]) != whole] == []
    words = [PARAGRAPH[i:j] for i, j in itertools.pairwise([0, *starts, len(PARAGRAPH)])]
    assert [t for w in words for t in _tok(llm, w)] == whole
    inside = [i for i in range(1, len(PARAGRAPH)) if PARAGRAPH[i].isspace() and PARAGRAPH[i - 1].isspace()]
    split_pieces = [(PARAGRAPH[i - 1 : i + 1])
                    for i in inside if _tok(llm, PARAGRAPH[:i]) + _tok(llm, PARAGRAPH[i:]) != whole]
    assert split_pieces == ["  ", "  ", "\n\n", "\n\n"]


def test_spm_differs_from_bpe(models: dict[str, Path]) -> None:
    from me_local.backends.llama.model import LoadedModel

    s1, a1 = (_llama(models[k], vocab_only=True) for k in ("s1", "a1"))
    # many word pieces in common, but the same text gives other tokens and another count
    shared = set(_pieces(s1, list(range(s1.n_vocab())))) & set(_pieces(a1, list(range(a1.n_vocab()))))
    assert {b" the", b" Hello", b" world", b"ing", b" and"} <= shared and len(shared) > 250
    assert (len(_tok(s1, PARAGRAPH)), len(_tok(a1, PARAGRAPH))) == (140, 128)
    assert _pieces(s1, _tok(s1, "The quick brown fox")) == [b"The", b" qu", b"ick", b" br", b"own", b" f", b"ox"]
    assert _pieces(a1, _tok(a1, "The quick brown fox")) == [b"The", b" quick", b" brown", b" fox"]
    fingerprints = {k: LoadedModel(models[k], vocab_only=True).fingerprint for k in ("s1", "s2", "a1")}
    assert fingerprints["s1"] == fingerprints["s2"] != fingerprints["a1"]


def test_spm_chat_template_and_end_of_turn(models: dict[str, Path]) -> None:
    llm = _llama(models["s1"], vocab_only=True)
    assert llm.metadata["tokenizer.chat_template"] == mtm.GEMMA
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=mtm.GEMMA, eos_token="<eos>", bos_token="<bos>"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Go"},
    ]
    assert formatter(messages=messages).prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nGo<end_of_turn>\n<start_of_turn>model\n"
    )
    tokens = llm.tokenize(formatter(messages=messages[1:2]).prompt.encode(), add_bos=False, special=True)
    assert tokens == [2, 4, *_tok(llm, "user"), 6, *_tok(llm, "Hi"), 5, 6, 4, *_tok(llm, "model"), 6]
    from me_local.backends.llama.model import LoadedModel

    assert LoadedModel(models["s1"], vocab_only=True).chat_tokens(messages[1:2]) == tokens  # one BOS, the template's
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)] == [1, 5]
    assert llm.detokenize([5]) == b"" and _pieces(llm, [4, 5], special=True) == [b"<start_of_turn>", b"<end_of_turn>"]


def test_spm_seeds_share_the_vocabulary_not_the_weights(
    models: dict[str, Path], tmp_path: Path
) -> None:
    assert _tokenizer_fields(models["s1"]) == _tokenizer_fields(models["s2"])
    assert _tokenizer_fields(models["s1"]) != _tokenizer_fields(models["a1"])
    again = mtm.build_tiny_model(tmp_path / "again.gguf", 1, vocab="s")
    assert again.read_bytes() == models["s1"].read_bytes()  # deterministic per seed
    prompt = b"<bos><start_of_turn>user\nHello world<end_of_turn>\n<start_of_turn>model\n"
    rows = [_next_token_logits(_llama(models[k], logits_all=True), prompt) for k in ("s1", "s2")]
    assert all(np.all(np.isfinite(row)) for row in rows)
    assert np.abs(rows[0] - rows[1]).max() > 1.0


def test_builds_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    mtm.build_tiny_model(tmp_path / "s.gguf", 7, vocab="s")
    assert time.perf_counter() - start < 0.5  # ~0.05 s
    start = time.perf_counter()
    assert sorted(mtm.build_default_set(tmp_path / "set")) == ["a1", "a2", "a3", "a4_nochat", "b1", "s1", "s2"]
    assert time.perf_counter() - start < 1.0  # ~0.16 s for the seven models of the tiny_models fixture


def _sample(path: Path, prompt: bytes, rng: np.random.Generator, n_runs: int = 3, n_tokens: int = 48) -> list[int]:
    """Tokens sampled at temperature 1 (until an end of generation, at most ``n_tokens`` a run)."""
    llm = _llama(path)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    prompt_tokens = llm.tokenize(prompt, add_bos=False, special=True)
    out = []
    for _ in range(n_runs):
        llm.reset()
        llm.eval(prompt_tokens)
        for _ in range(n_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            probs = np.exp(logits - logits.max())
            token = int(rng.choice(n_vocab, p=probs / probs.sum()))
            out.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            llm.eval([token])
    return out


@pytest.mark.parametrize(
    ("key", "prompt", "low", "high"),
    [
        ("s1", b"<bos><start_of_turn>user\nHello world<end_of_turn>\n<start_of_turn>model\n", 0.2, 0.5),
        ("s2", b"<bos>The quick brown fox", 0.2, 0.5),
        ("a1", b"<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n", 0.12, 0.4),
    ],
)
def test_sampled_words_are_a_few_tokens_long(
    models: dict[str, Path], key: str, prompt: bytes, low: float, high: float
) -> None:
    """Random weights still give words of a few tokens: 20-50% of the tokens sampled at
    temperature 1 start a word (vocab "s" scales those output rows up, ROW_SCALES), and an
    end of generation is rare."""
    llm = _llama(models[key], vocab_only=True)
    word_initial = [p[:1].isspace() for p in _pieces(llm, list(range(llm.n_vocab())))]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens = _sample(models[key], prompt, np.random.default_rng(0))
    n_eog = sum(bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in tokens)
    words = [t for t in tokens if not llama_cpp.llama_vocab_is_eog(vocab, t)]
    fraction = sum(word_initial[t] for t in words) / len(words)
    assert low <= fraction <= high, fraction
    assert n_eog <= 1 and len(words) >= 100
