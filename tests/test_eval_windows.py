"""Long texts for ``me-local eval``/``tune``: read in chunks, cut after whitespace into pieces
and packed into windows that fit a token budget, every byte in exactly one window."""

from __future__ import annotations

import pytest

from me_local.errors import UsageError
from me_local.evaluation.windows import fit, pieces, read_text, split_half, windows

PARAGRAPHS = ["It was a bright cold day in April, and the clocks were striking.\n\n",
              "The hallway smelt of boiled cabbage and old rag mats. \n \n\n",
              "At one end of it a coloured poster, too large for indoor display.\n"]
TEXT = "".join(PARAGRAPHS) * 5


def words(text: str) -> list[int]:
    """A stand-in tokenizer for two vocabularies: words, and characters / 4."""
    return [len(text.split()), (len(text) + 3) // 4]


def chunked(text: str, n: int):
    return (text[i:i + n] for i in range(0, len(text), n))


@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
def test_pieces_are_paragraphs_whatever_the_chunks(chunk):
    got = list(pieces(chunked(TEXT, chunk)))
    assert "".join(got) == TEXT
    p1, p2, p3 = PARAGRAPHS  # a piece ends after its whole run of blank lines; p3 has none after it
    assert got == [p1, p2] + [p3 + p1, p2] * 4 + [p3]


def test_a_long_paragraph_is_cut_after_whitespace_and_a_long_word_where_it_must():
    para = "word " * 100  # 500 characters, no blank line
    got = list(pieces([para + "x" * 250 + " tail"], max_chars=120))
    assert "".join(got) == para + "x" * 250 + " tail"
    assert all(len(p) <= 120 for p in got)
    assert all(p.endswith(" ") for p in got[:4])  # cut after whitespace, never inside "word"
    assert "x" * 120 in got  # no whitespace in 120 characters: cut there


def test_windows_fit_the_budget_of_every_vocabulary_and_keep_every_byte():
    for budget in (12, 20, 60, 1000):
        ws = list(windows(pieces([TEXT]), words, budget))
        assert "".join(ws) == TEXT
        assert all(max(words(w)) <= budget for w in ws), budget
        if budget >= 20:
            assert all(w[-1].isspace() for w in ws[:-1])  # windows end after whitespace
    assert len(list(windows(pieces([TEXT]), words, 1000))) == 1


def test_a_piece_over_the_budget_is_halved_at_whitespace_until_it_fits():
    para = " ".join(f"w{i}" for i in range(64)) + "\n\n"
    parts = list(fit(para, words, 10))
    assert "".join(p for p, _ in parts) == para
    assert all(max(c) <= 10 for _, c in parts)
    assert all(p.endswith(" ") for p, _ in parts[:-1])
    assert split_half("abcdef") == ("abc", "def")
    assert split_half("aaaa bb cccccc") == ("aaaa bb ", "cccccc")


def test_read_text_streams_utf8_and_names_a_bad_byte(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld " * 1000, encoding="utf-8")
    chunks = list(read_text(p, chunk_chars=1000))
    assert "".join(chunks) == "héllo wörld " * 1000 and len(chunks) > 10  # split characters are joined
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n" * 3 + b"caf\xe9\n")
    with pytest.raises(UsageError, match=r"bad.txt: byte 33 is not UTF-8 text; convert the file to UTF-8"):
        list(read_text(bad))
    with pytest.raises(UsageError, match="cannot read"):
        list(read_text(tmp_path / "nope.txt"))
