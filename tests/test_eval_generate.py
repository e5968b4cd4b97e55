"""``me-local eval --task --generate``: questions asked with lettered choices, the letter read
from each mode's answer, accuracy per mode over seeds, on tiny real models (whose answers are
noise: what is checked is that every answer is counted as the extractor reads it, and that each
answer is the engine's own generation for that mode and seed)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from me_local.cli import cli
from me_local.config import load_config
from me_local.engine import Engine, Request, collect, sampling_params
from me_local.evaluation.generate import DEFAULT_ANSWER_REGEX, compile_extractor, extract, prompt
from me_local.evaluation.tasks import parse_line, read_tasks

from .test_eval_cli import config, task_file  # noqa: F401 (the module's fixture)

RX = re.compile(DEFAULT_ANSWER_REGEX)
CHOICES = ("Paris", "Madrid", "Rome")


@pytest.mark.parametrize(("answer", "picked"), [
    ("B", 1), ("The answer is C. Rome.", 2), ("(A) Paris", 0), ("A. Fahrenheit\nB. Kelvin", 0),
    ("D. none of these, so B", 1),  # D is no choice's letter here
    ("It is Paris, of course.", 0),  # no letter: the one choice named
    ("Paris or Rome", None), ("I do not know", None), ("b", None),
])
def test_the_answer_is_the_first_letter_of_a_choice_or_the_one_choice_named(answer, picked):
    assert extract(answer, CHOICES, RX) == picked


def test_a_custom_extractor_needs_one_group():
    rx = compile_extractor(r"Answer: \(?([a-z])\)?")
    assert extract("Answer: (b)", ("x", "y"), compile_extractor(r"Answer: ([A-Z])")) is None
    assert extract("Answer: B", ("x", "y"), compile_extractor(r"Answer: ([A-Z])")) == 1
    assert rx.groups == 1
    with pytest.raises(Exception, match="must have exactly one group"):
        compile_extractor(r"[A-D]")
    with pytest.raises(Exception, match="is not a regular expression"):
        compile_extractor(r"([A-D]")


def test_the_prompt_lists_the_choices_under_letters():
    arc = parse_line(json.dumps({"question": {"stem": "Which is a mammal?", "choices": [
        {"text": "a whale", "label": "1"}, {"text": "a shark", "label": "2"}]}, "answerKey": "1"}), 1)
    assert prompt(arc) == "Which is a mammal?\n\nA. a whale\nB. a shark\n\nAnswer with the letter of the right choice."
    hs = parse_line(json.dumps({"ctx": "She put the kettle on and", "endings": ["waited.", "flew."], "label": 0}), 2)
    assert prompt(hs).startswith("Which ending continues this text best?\nShe put the kettle on and\n\nA. waited.")


def test_generate_counts_every_answer_per_mode_and_each_is_the_engines_generation(config, tmp_path):  # noqa: F811
    p = task_file(tmp_path)
    out_dir = tmp_path / "out"
    r = CliRunner().invoke(cli, ["eval", "--config", str(config), "-e", "pair", "--task", str(p), "--generate",
                                 "--seeds", "2", "--limit", "3", "-n", "6", "--json", "--out", str(out_dir)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert list(out["modes"]) == ["me", "ce", "single:one", "single:two"]
    assert out["questions"] == 3 and out["seeds"] == 2 and out["sampling"]["max_tokens"] == 6
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 4 * 2
    questions = list(read_tasks(p))[:3]
    by_line = {q.line: q for q in questions}
    for mode, m in out["modes"].items():
        mine = [s for s in samples if s["mode"] == mode]
        for s in mine:
            q = by_line[s["line"]]
            picked = extract(s["answer"], q.choices, RX)
            assert s["picked"] == (None if picked is None else "ABC"[picked]) and s["right"] == (picked == q.answer)
        assert m["right"] == sum(s["right"] for s in mine) and m["answers"] == 6
        assert m["accuracy"] == pytest.approx(m["right"] / 6)
        assert m["unanswered"] == sum(s["picked"] is None for s in mine)
        assert m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
    assert set(out["difference"]) == {"me minus ce", "me minus best member"}
    # each answer is what the engine generates for that question, mode and seed
    engine = Engine(load_config(config))
    try:
        cfg = engine.config.get("pair")
        for s in (samples[0], samples[3], samples[5], samples[-1]):
            mode, _, member = s["mode"].partition(":")
            req = Request(ensemble="pair", messages=[{"role": "user", "content": prompt(by_line[s["line"]])}],
                          params=sampling_params(cfg.sampling, max_tokens=6, seed=s["seed"]), mode=mode,
                          member=member or None)
            assert collect(engine.generate(req))[0] == s["answer"]
    finally:
        engine.close()
    table = CliRunner().invoke(cli, ["eval", "--config", str(config), "-e", "mixed", "--task", str(p), "--generate",
                                     "--seeds", "1", "--limit", "2", "-n", "4"], catch_exceptions=False).stdout
    assert "single:spm" in table and "\n  ce " not in table  # ce needs one vocabulary
    assert "me minus best member" in table


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "2"], "--seeds is for --generate"),
    (["-n", "5"], "--max-tokens is for --generate"),
    (["--generate", "--delimiter", ""], "--delimiter is for scoring choices by likelihood"),
    (["--generate", "--answer-regex", "[A-D]"], "must have exactly one group"),
])
def test_generate_options_are_refused_where_they_do_not_apply(config, tmp_path, args, message):  # noqa: F811
    p = task_file(tmp_path)
    r = CliRunner().invoke(cli, ["eval", "--config", str(config), "-e", "pair", "--task", str(p), *args])
    assert r.exit_code == 2 and message in r.stderr
    r = CliRunner().invoke(cli, ["eval", "--config", str(config), "--generate", str(p)])
    assert r.exit_code == 2 and "--generate asks the questions of a --task file" in r.stderr
