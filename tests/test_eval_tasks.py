"""Task files for ``me-local eval --task``: the three shapes of line, lm-evaluation-harness's
contexts for ARC and HellaSwag, and one-line errors that name the line and the field."""

from __future__ import annotations

import json

import pytest

from me_local.errors import UsageError
from me_local.evaluation.tasks import Question, hellaswag_preprocess, parse_line, read_tasks


def line(obj) -> str:
    return json.dumps(obj)


def test_own_shape():
    q = parse_line(line({"context": "2 + 2 =", "choices": ["4", "5"], "answer": 0}), 1)
    assert q == Question("2 + 2 =", ("4", "5"), 0, 1, "me-local")


def test_arc_shapes_as_released_and_as_hugging_face_writes_them():
    released = {"id": "Mercury_7175875", "question": {"stem": "Which is a mammal?", "choices": [
        {"text": "shark", "label": "A"}, {"text": "whale", "label": "B"}, {"text": "trout", "label": "C"}]},
        "answerKey": "B"}
    hf = {"question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"],
                                                        "label": ["A", "B", "C"]}, "answerKey": "B"}
    numeric = {"question": "Which is a mammal?", "choices": {"text": ["shark", "whale"], "label": ["1", "2"]},
               "answerKey": "2"}
    for obj, n in ((released, 3), (hf, 3), (numeric, 2)):
        q = parse_line(line(obj), 4)
        assert q.context == "Question: Which is a mammal?\nAnswer:"  # lm-evaluation-harness's arc_easy prompt
        assert q.choices[:2] == ("shark", "whale") and len(q.choices) == n
        assert q.answer == 1 and q.shape == "arc" and q.line == 4


def test_hellaswag_shape_is_cleaned_as_lm_evaluation_harness_does():
    obj = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
           "ctx": "A man is sitting on a roof. he",
           "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof."],
           "label": "1"}
    q = parse_line(line(obj), 2)
    assert q.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert q.choices[1] == "starts pulling up roofing on a roof." and q.answer == 1 and q.shape == "hellaswag"
    bare = parse_line(line({"ctx": "Then she", "endings": ["sat.", "ran."], "label": 0}), 3)
    assert bare.context == "Then she" and bare.answer == 0
    cleaned = hellaswag_preprocess(" How to cook [title] Boil water. [step] Add salt.  ")
    assert cleaned == "How to cook. Boil water. Add salt."


BAD = [
    ('{"context": "x", "choices": ["a", "b"], "answer": 2}', '"answer" is 2 but there are 2 choices (0 to 1)'),
    ('{"context": "x", "choices": ["a", "b"], "answer": "0"}', '"answer" must be the index of the right choice'),
    ('{"context": "x", "choices": ["a"], "answer": 0}', '"choices" must be a list of at least two strings'),
    ('{"context": "x", "choices": ["a", 3], "answer": 0}', '"choices"[1] must be a non-empty string'),
    ('{"context": "x", "choices": ["a", "b"]}', '"answer" is missing'),
    ('{"context": 5, "choices": ["a", "b"], "answer": 0}', '"context" must be a string, not int'),
    ('{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, '
     '"answerKey": "E"}', '"answerKey" is \'E\', which is none of the labels A, B'),
    ('{"question": {"stem": "q"}, "answerKey": "A"}', '"choices" is missing'),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}',
     '"choices" must have "text" and "label" lists of the same length'),
    ('{"ctx": "x", "endings": ["a", "b"], "label": 5}', '"label" is 5 but there are 2 choices'),
    ('{"ctx": "x", "endings": ["a", "b"]}', '"label" is missing'),
    ('{"ctx": "x", "label": 0}', '"endings" is missing'),
    ('{"prompt": "x"}', "not a task line (keys prompt)"),
    ("[1, 2]", "a JSON object is needed, not list"),
    ('{"context": "x",', "not JSON"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_a_bad_line_names_its_line_and_field(text, message):
    with pytest.raises(UsageError) as err:
        parse_line(text, 7, "t.jsonl")
    assert str(err.value).startswith("t.jsonl: line 7: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_read_tasks_skips_blank_lines_and_counts_lines_from_one(tmp_path):
    p = tmp_path / "t.jsonl"
    good = line({"context": "a", "choices": ["b", "c"], "answer": 1})
    p.write_text(f"{good}\n\n{good}\n{{\"context\": \"a\"}}\n")
    qs = read_tasks(p)
    assert next(qs).line == 1 and next(qs).line == 3
    with pytest.raises(UsageError, match=r"line 4: \"choices\" is missing"):
        next(qs)
    with pytest.raises(UsageError, match="cannot read task file"):
        list(read_tasks(tmp_path / "missing.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + b"\n" + b'{"context": "caf\xe9"}\n')
    with pytest.raises(UsageError, match="line 2: not UTF-8 text"):
        list(read_tasks(tmp_path / "latin1.jsonl"))
