"""``tune --write``'s edit of models.yaml: the weight scalars replaced where they are, a missing
``weight:`` inserted in its mapping's style, everything else byte for byte; refused with the
weights to set by hand where an in-place edit is not safe."""

from __future__ import annotations

import re

import pytest
import yaml

from me_local.config import packaged_config_path, parse_config
from me_local.errors import ConfigError
from me_local.evaluation.yamledit import format_weight, set_weights

BLOCK = """\
# my ensembles
ensembles:
  mine:   # the one I tune
    mode: me
    members:
      - name: a      # first
        path: /models/a.gguf
        weight: 1    # keep this comment
      - name: b
        path: "/models/b.gguf"   # quoted, commented
        system: |-
          Line one.

          Line two.
  other:
    members:
      - name: a
        path: /models/a.gguf
        weight: 0.25
"""


def outside(text: str, spans: list[tuple[int, int]]) -> str:
    """The text with the given (start, end) spans cut out."""
    out, at = [], 0
    for s, e in sorted(spans):
        out.append(text[at:s])
        at = e
    return "".join(out) + text[at:]


def test_format_weight_always_reads_back_as_the_same_float():
    for w, text in [(0.6, "0.6"), (1, "1.0"), (0.123456, "0.1235"), (0.0, "0.0"), (1e-5, "0.0"), (12.5, "12.5")]:
        assert format_weight(w) == text
        assert isinstance(yaml.safe_load(text), float)


def test_existing_weight_replaced_missing_one_inserted_in_block_style_rest_byte_for_byte(tmp_path):
    new = set_weights(BLOCK, "mine", {"a": 0.7123, "b": 0.2877})
    assert "        weight: 0.7123    # keep this comment\n" in new
    # b had no weight: a line after its path, at its keys' indentation
    assert '        path: "/models/b.gguf"   # quoted, commented\n        weight: 0.2877\n        system: |-\n' in new
    # every other byte is the original's: remove the edits and compare
    i = BLOCK.index("weight: 1") + len("weight: ")
    old_rest = BLOCK[:i] + BLOCK[i + 1:]
    j = new.index("weight: 0.7123") + len("weight: ")
    inserted = new.index("        weight: 0.2877\n")
    assert outside(new, [(j, j + 6), (inserted, inserted + len("        weight: 0.2877\n"))]) == old_rest
    cfg = parse_config(new, tmp_path / "models.yaml")
    assert [m.weight for m in cfg.ensembles["mine"].members] == [0.7123, 0.2877]
    assert [m.weight for m in cfg.ensembles["other"].members] == [0.25]
    assert cfg.ensembles["mine"].members[1].system == "Line one.\n\nLine two."


def test_flow_mappings_get_their_weight_inside_the_braces():
    text = "ensembles:\n  t:\n    members:\n      - {name: one, path: /a.gguf, weight: 1}  # x\n" \
           "      - {name: two, path: /b.gguf}\n"
    new = set_weights(text, "t", {"one": 0.4, "two": 0.6})
    assert new == ("ensembles:\n  t:\n    members:\n      - {name: one, path: /a.gguf, weight: 0.4}  # x\n"
                   "      - {name: two, path: /b.gguf, weight: 0.6}\n")


def test_crlf_line_endings_and_a_missing_final_newline_are_kept():
    text = "ensembles:\r\n  t:\r\n    members:\r\n    - name: one\r\n      path: /a.gguf"
    new = set_weights(text, "t", {"one": 0.5})
    assert new == "ensembles:\r\n  t:\r\n    members:\r\n    - name: one\r\n      path: /a.gguf\r\n      weight: 0.5"


def test_a_tagged_weight_is_replaced_whole_and_a_folded_path_gets_the_weight_after_the_name():
    tagged = "ensembles:\n  t:\n    members:\n      - name: a\n        path: /a\n        weight: !!float 1\n"
    assert set_weights(tagged, "t", {"a": 0.25}) == tagged.replace("!!float 1", "0.25")
    folded = "ensembles:\n  t:\n    members:\n      - name: a\n        path: >-\n          /long/\n          path\n"
    assert set_weights(folded, "t", {"a": 0.25}) == folded.replace("name: a\n", "name: a\n        weight: 0.25\n")


def test_members_not_named_keep_their_weights():
    new = set_weights(BLOCK, "mine", {"b": 0.5})
    assert "weight: 1    # keep this comment" in new and "weight: 0.5\n        system" in new


@pytest.mark.parametrize(("text", "reason"), [
    ("base: &m {name: a, path: /a.gguf}\nensembles:\n  t:\n    members: [*m]\n", "anchors or aliases"),
    ("ensembles:\n  t:\n    members:\n      - name: a\n        path: /a\n        weight: '0.5'\n",
     "weight is not a plain number"),
    ("ensembles:\n  t:\n    members:\n      - name: a\n        path: /a\n      - name: a\n        path: /b\n",
     "listed twice"),
    ("ensembles:\n  u:\n    members: []\n", "`t` is not in the file"),
    ("ensembles:\n  t:\n    members:\n      - name: b\n        path: /a\n", "has no member 'a'"),
    ("ensembles:\n  t:\n    members:\n      - name: >-\n          a\n        path: >-\n          /x/\n          y\n",
     "not on single lines"),
])
def test_unsafe_edits_are_refused_with_the_weights_to_set_by_hand(text, reason):
    with pytest.raises(ConfigError) as err:
        set_weights(text, "t", {"a": 0.25}, file="models.yaml")
    msg = str(err.value)
    assert msg.startswith("models.yaml: ") and reason in msg
    assert msg.endswith("set them by hand instead: a: 0.25") and "\n" not in msg


def test_the_packaged_file_edits_cleanly_keeping_its_comments():
    """The shipped models.yaml is refused by tune --write (it lives in the package), but its layout
    is what users copy: it must edit cleanly."""
    text = packaged_config_path().read_text()
    new = set_weights(text, "default", {"smollm": 0.35, "gemma": 0.65})
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines()) if a != b]
    assert changed == [("        weight: 0.6", "        weight: 0.35"), ("        weight: 0.4", "        weight: 0.65")]
    assert len(re.findall(r"#", new)) == len(re.findall(r"#", text))
