"""Multiple-choice task files (JSON Lines), read one line at a time.

Three shapes of line are accepted (docs/eval.md):

- me-local's own: ``{"context": str, "choices": [str, ...], "answer": index}``;
- ARC (AI2 Reasoning Challenge), as its JSON Lines files and as Hugging Face datasets write
  it: ``{"question": {"stem": str, "choices": [{"text", "label"}, ...]}, "answerKey": label}``
  or ``{"question": str, "choices": {"text": [...], "label": [...]}, "answerKey": label}``
  (``choices`` may sit in ``question`` or beside it, as a list of ``{"text", "label"}`` or
  as ``{"text": [...], "label": [...]}``). The context is lm-evaluation-harness's:
  ``"Question: " + stem + "\\nAnswer:"``;
- HellaSwag: ``{"ctx": str, "endings": [str, ...], "label": index}`` (``label`` may be a
  string of digits, as in Hugging Face's copy), with ``activity_label``, ``ctx_a`` and
  ``ctx_b`` used as lm-evaluation-harness uses them when present.

A line that fits none of them, or whose fields are wrong, is a :class:`~me_local.errors.UsageError`
naming the file, the line number and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError

SHAPES = ("me-local", "arc", "hellaswag")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: each choice is scored as the continuation of ``context``."""

    context: str
    choices: tuple[str, ...]
    answer: int
    """Index of the right choice."""
    line: int
    """Its line in the task file (1-based)."""
    shape: str
    """Which shape of line it was read from (one of SHAPES)."""
    question: str = ""
    """The question as a person would be asked it (``eval --generate``'s prompt): the context,
    ARC's stem, or HellaSwag's context with the instruction to pick the ending."""

    @property
    def asked(self) -> str:
        return self.question or self.context


class _Bad(Exception):
    """A field is wrong: the message names it."""


def read_tasks(path: str | Path) -> Iterator[Question]:
    """The questions of a JSON Lines task file, in order (blank lines skipped). Raises
    UsageError for a file that cannot be read or a line that is not a question."""
    p = Path(path)
    try:
        f = p.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read task file {str(p)!r} ({exc.strerror or exc}); check the path") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM may begin the file
            except UnicodeDecodeError as exc:
                raise UsageError(f"{p}: line {line_no}: not UTF-8 text (byte {exc.start + 1} of the line); "
                                 "save the task file as UTF-8") from None
            if line.strip():
                yield parse_line(line, line_no, str(p))


def parse_line(line: str, line_no: int, file: str = "<task>") -> Question:
    """One line of a task file; a UsageError names the file, the line and the field."""
    where = f"{file}: line {line_no}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); "
                         "each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: a JSON object is needed, not {type(obj).__name__}")
    try:
        if "endings" in obj or "ctx" in obj:
            return _hellaswag(obj, line_no)
        if "answerKey" in obj or isinstance(obj.get("question"), dict):
            return _arc(obj, line_no)
        if "context" in obj or "choices" in obj or "answer" in obj:
            return _native(obj, line_no)
    except _Bad as exc:
        raise UsageError(f"{where}: {exc}") from None
    raise UsageError(f"{where}: not a task line (keys {', '.join(sorted(map(str, obj))) or 'none'}): expected "
                     '{"context", "choices", "answer"}, an ARC line (question, choices, answerKey) or a '
                     "HellaSwag line (ctx, endings, label); see docs/eval.md")


def _string(obj: Mapping[str, Any], key: str, *, empty: bool = True) -> str:
    if key not in obj:
        raise _Bad(f'"{key}" is missing')
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f'"{key}" must be a string, not {_kind(value)}')
    if not empty and not value.strip():
        raise _Bad(f'"{key}" is empty')
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _choices(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise _Bad(f'"{key}" must be a list of at least two strings')
    for i, c in enumerate(value):
        if not isinstance(c, str) or not c:
            raise _Bad(f'"{key}"[{i}] must be a non-empty string, not {c!r}')
    return tuple(value)


def _index(value: Any, key: str, n: int, *, digits: bool = False) -> int:
    if digits and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f'"{key}" must be the index of the right choice (an integer), not {value!r}')
    if not 0 <= value < n:
        raise _Bad(f'"{key}" is {value} but there are {n} choices (0 to {n - 1})')
    return value


def _native(obj: Mapping[str, Any], line_no: int) -> Question:
    context = _string(obj, "context")
    if "choices" not in obj:
        raise _Bad('"choices" is missing')
    choices = _choices(obj["choices"], "choices")
    if "answer" not in obj:
        raise _Bad('"answer" is missing')
    answer = _index(obj["answer"], "answer", len(choices))
    return Question(context, choices, answer, line_no, "me-local")


def _arc(obj: Mapping[str, Any], line_no: int) -> Question:
    q = obj.get("question")
    if isinstance(q, dict):
        stem = _string(q, "stem", empty=False)
        raw = q.get("choices", obj.get("choices"))
        ckey = "question.choices" if "choices" in q else "choices"
    elif isinstance(q, str):
        if not q.strip():
            raise _Bad('"question" is empty')
        stem, raw, ckey = q, obj.get("choices"), "choices"
    else:
        raise _Bad('"question" must be a string or an object with "stem"' if q is not None else '"question" is missing')
    if raw is None:
        raise _Bad('"choices" is missing (beside "question" or inside it)')
    if isinstance(raw, dict):
        texts, labels = raw.get("text"), raw.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise _Bad(f'"{ckey}" must have "text" and "label" lists of the same length')
        pairs = list(zip(texts, labels))
    elif isinstance(raw, list):
        pairs = []
        for i, c in enumerate(raw):
            if not isinstance(c, dict) or "text" not in c or "label" not in c:
                raise _Bad(f'"{ckey}"[{i}] must be an object with "text" and "label"')
            pairs.append((c["text"], c["label"]))
    else:
        raise _Bad(f'"{ckey}" must be a list of {{"text", "label"}} or {{"text": [...], "label": [...]}}')
    choices = _choices([t for t, _ in pairs], f"{ckey}.text")
    labels = [str(lab) for _, lab in pairs]
    if len(set(labels)) != len(labels):
        raise _Bad(f'"{ckey}" has a label twice: {", ".join(labels)}')
    if "answerKey" not in obj:
        raise _Bad('"answerKey" is missing')
    key = obj["answerKey"]
    if not isinstance(key, (str, int)) or isinstance(key, bool) or str(key) not in labels:
        raise _Bad(f'"answerKey" is {key!r}, which is none of the labels {", ".join(labels)}')
    return Question(f"Question: {stem}\nAnswer:", choices, labels.index(str(key)), line_no, "arc", stem)


_BRACKETS = re.compile(r"\[.*?\]")


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning: WikiHow's ``[title]`` marks become
    sentence ends, other bracketed marks go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    return text.replace("  ", " ")


def _hellaswag(obj: Mapping[str, Any], line_no: int) -> Question:
    if "ctx_a" in obj and "ctx_b" in obj:
        a, b = _string(obj, "ctx_a"), _string(obj, "ctx_b")
        ctx = a + " " + b.capitalize()
    else:
        ctx = _string(obj, "ctx", empty=False)
    label = obj.get("activity_label")
    if label is not None and not isinstance(label, str):
        raise _Bad(f'"activity_label" must be a string, not {_kind(label)}')
    context = hellaswag_preprocess(f"{label}: {ctx}" if label else ctx)
    if "endings" not in obj:
        raise _Bad('"endings" is missing')
    endings = tuple(hellaswag_preprocess(e) for e in _choices(obj["endings"], "endings"))
    for i, e in enumerate(endings):
        if not e:
            raise _Bad(f'"endings"[{i}] is empty once cleaned')
    if "label" not in obj:
        raise _Bad('"label" is missing')
    answer = _index(obj["label"], "label", len(endings), digits=True)
    asked = f"Which ending continues this text best?\n{context}"
    return Question(context, endings, answer, line_no, "hellaswag", asked)
