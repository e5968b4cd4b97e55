"""The pure parts of scripts/lm_eval_check.py: how it reads `me-local eval --json` under
lm-evaluation-harness's metric names, and when it calls the two in agreement. lm-eval itself is
not installed here; its formulas are restated below from lm-eval 0.4.13's lm_eval/api/task.py
(``process_results``: multiple_choice and loglikelihood_rolling) and lm_eval/api/metrics.py
(``weighted_perplexity``, ``bits_per_byte``), so the check's mapping is tested against them."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from me_local.evaluation.report import task_report, text_report
from me_local.evaluation.run import ChoiceScores, Scored, TaskTally, Totals
from me_local.evaluation.tasks import Question

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lm_eval_check.py"


@pytest.fixture(scope="module")
def check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_eval_check", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# lm-eval 0.4.13's formulas, restated -----------------------------------------------------------


def lm_eval_mc(lls: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """``process_results`` for multiple_choice: argmax of lls, per character, per byte."""
    x = np.array(lls)
    chars = np.array([float(len(c)) for c in choices])
    n_bytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
    return {"acc": float(np.argmax(x) == gold), "acc_norm": float(np.argmax(x / chars) == gold),
            "acc_bytes": float(np.argmax(x / n_bytes) == gold)}


def lm_eval_ppl(docs: list[tuple[float, str]]) -> dict[str, float]:
    """``process_results`` for loglikelihood_rolling, then the weighted aggregations."""
    ll = sum(lp for lp, _ in docs)
    words = sum(len(re.split(r"\s+", t)) for _, t in docs)
    n_bytes = sum(len(t.encode("utf-8")) for _, t in docs)
    return {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / n_bytes),
            "bits_per_byte": -ll / n_bytes / math.log(2)}


def lm_eval_results(questions: list[tuple[list[float], list[str], int]], docs: list[tuple[float, str]]
                    ) -> dict[str, Any]:
    per_q = [lm_eval_mc(lls, choices, gold) for lls, choices, gold in questions]
    mc = {f"{m},none": sum(q[m] for q in per_q) / len(per_q) for m in ("acc", "acc_norm", "acc_bytes")}
    return {"me_local_mc": mc, "me_local_ppl": {f"{m},none": v for m, v in lm_eval_ppl(docs).items()}}


# me-local eval's JSON, made by its own report code from the same numbers ------------------------


def eval_task_json(questions: list[tuple[list[float], list[str], int]]) -> dict[str, Any]:
    """One member whose log-likelihoods are the ensemble's (the check compares the ensemble)."""
    tally = TaskTally(("m", "ensemble"))
    for i, (lls, choices, gold) in enumerate(questions):
        q = Question("Q:", tuple(choices), gold, i + 1, "me-local")
        logp = np.array([lls, lls], dtype=np.float64)
        tally.add(ChoiceScores(q, logp, np.array([len(c.encode()) for c in choices], dtype=np.int64)))
    return task_report("t.jsonl", "e", "token", [1.0], tally, " ", {"me-local": len(questions)})


def eval_text_json(docs: list[tuple[float, str]]) -> dict[str, Any]:
    files = []
    for i, (lp, text) in enumerate(docs):
        t = Totals.empty(("m",))
        t.add(Scored(np.array([lp]), lp), text)
        files.append((f"doc-{i:02d}.txt", t))
    return text_report("e", "token", [1.0], files, 1015)


QUESTIONS = [
    ([-1.0, -3.0, -4.0], ["Paris", "Rome", "Berlin"], 0),
    ([-6.0, -6.0], ["ééé", "abcd"], 0),  # per byte ééé (-1.0) beats abcd (-1.5); per character it loses (-2.0)
    ([-2.0, -1.0], ["seven", "five"], 0),
]
DOCS = [(-120.25, "The first paragraph, in plain words."), (-80.5, "A second one; shorter.")]


def test_me_local_eval_figures_are_lm_evals_metrics_on_the_same_likelihoods(check: ModuleType) -> None:
    report = check.compare_metrics(lm_eval_results(QUESTIONS, DOCS),
                                   check.eval_metrics(eval_task_json(QUESTIONS), eval_text_json(DOCS)))
    got = {(r["task"], r["metric"]): r for r in report}
    assert set(got) == {("me_local_mc", m) for m in ("acc", "acc_norm", "acc_bytes")} | {
        ("me_local_ppl", m) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    # me-local's acc_norm divides by bytes: lm-eval's acc_bytes, not its acc_norm (per character)
    assert got["me_local_mc", "acc_bytes"]["agree"]
    assert got["me_local_mc", "acc_bytes"]["lm_eval"] == pytest.approx(2 / 3)
    assert not got["me_local_mc", "acc_norm"]["agree"]
    assert got["me_local_mc", "acc_norm"]["lm_eval"] == pytest.approx(1 / 3)
    assert got["me_local_mc", "acc_norm"]["me_local_eval"] == pytest.approx(2 / 3)
    for m in ("acc", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        task = "me_local_mc" if m == "acc" else "me_local_ppl"
        assert got[task, m]["agree"], got[task, m]
        assert abs(got[task, m]["diff"]) <= 1e-12 * max(1.0, abs(got[task, m]["lm_eval"]))


def test_on_ascii_choices_acc_norm_agrees_and_a_changed_answer_does_not(check: ModuleType) -> None:
    ascii_q = [QUESTIONS[0], QUESTIONS[2]]
    rows = check.compare_metrics(lm_eval_results(ascii_q, DOCS),
                                 check.eval_metrics(eval_task_json(ascii_q), eval_text_json(DOCS)))
    assert all(r["agree"] for r in rows)
    moved = [QUESTIONS[0], ([-1.0, -2.0], ["seven", "five"], 0)]  # lm-eval saw the third question answered right
    rows = check.compare_metrics(lm_eval_results(moved, DOCS),
                                 check.eval_metrics(eval_task_json(ascii_q), eval_text_json(DOCS)))
    assert {r["metric"] for r in rows if not r["agree"]} == {"acc", "acc_norm", "acc_bytes"}


def test_a_metric_off_by_more_than_float_noise_disagrees(check: ModuleType) -> None:
    ours = check.eval_metrics(eval_task_json(QUESTIONS), eval_text_json(DOCS))
    theirs = lm_eval_results(QUESTIONS, DOCS)
    theirs["me_local_ppl"]["bits_per_byte,none"] *= 1 + 1e-6
    rows = {r["metric"]: r["agree"] for r in check.compare_metrics(theirs, ours)}
    assert rows["bits_per_byte"] is False and rows["byte_perplexity"] is True


def sample(doc_id: int, ll: float) -> dict[str, Any]:
    """A line of lm-eval's samples_me_local_ppl_*.jsonl, as much of it as the check reads."""
    return {"doc_id": doc_id, "resps": [[ll]]}


def test_documents_agree_only_with_the_same_likelihood_words_bytes_and_one_window(check: ModuleType) -> None:
    docs = [{"text": t} for _, t in DOCS]
    text = eval_text_json(DOCS)
    rows = check.compare_documents([sample(1, DOCS[1][0] + 1e-12), sample(0, DOCS[0][0])], docs, text)
    assert [r["doc"] for r in rows] == [0, 1] and all(r["agree"] for r in rows)
    assert rows[0]["lm_eval_words"] == rows[0]["me_local_words"] == 6

    off = check.compare_documents([sample(0, DOCS[0][0] - 0.01), sample(1, DOCS[1][0])], docs, text)
    assert [r["agree"] for r in off] == [False, True]

    text["files"][1]["windows"] = 2  # me-local scored it in two windows: not lm-eval's sum
    assert [r["agree"] for r in check.compare_documents([sample(0, DOCS[0][0]), sample(1, DOCS[1][0])], docs,
                                                        text)] == [True, False]


def test_a_document_ending_in_whitespace_has_one_more_word_for_lm_eval(check: ModuleType) -> None:
    """lm-eval's count_words splits with re.split(r"\\s+"): whitespace at an end counts an empty
    word, which me-local's count does not."""
    assert check.lm_eval_words("two words") == 2
    assert check.lm_eval_words("two words\n") == 3
    assert check.lm_eval_words(" two words\n") == 4
    docs = [(-10.0, "two words\n")]
    rows = check.compare_documents([sample(0, -10.0)], [{"text": docs[0][1]}], eval_text_json(docs))
    assert (rows[0]["lm_eval_words"], rows[0]["me_local_words"], rows[0]["agree"]) == (3, 2, False)


def test_each_document_is_written_byte_for_byte_as_a_file_of_its_own(check: ModuleType, tmp_path: Path) -> None:
    paths = check.write_documents([{"text": "caf\u00e9 one"}, {"text": "two\n\nparas"}], tmp_path / "docs")
    assert [p.name for p in paths] == ["doc-00.txt", "doc-01.txt"]
    assert [p.read_bytes() for p in paths] == ["caf\u00e9 one".encode(), b"two\n\nparas"]


def test_the_script_refuses_to_run_under_ci(check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("sys.argv", ["lm_eval_check.py"])

    def install(venv: Path) -> Path:
        raise AssertionError("it went on to install lm-eval")

    monkeypatch.setattr(check, "ensure_venv", install)
    with pytest.raises(SystemExit, match="not run in CI"):
        check.main()
