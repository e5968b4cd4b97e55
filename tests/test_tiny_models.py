"""Checks that the fabricated tiny GGUF models (scripts/make_tiny_models.py) work in llama.cpp."""

from __future__ import annotations

import importlib.util
import sys
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
