"""``me-local eval`` and ``me-local tune`` on tiny real models (a1, a2 share a vocabulary; s1 has
another): the figures equal the engine's own scoring of the same text, long texts go in windows,
task accuracy equals choosing by the engine's scores, the weights written back keep the file,
and every mistake is one line with exit status 2."""

from __future__ import annotations

import json
import math
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from me_local.cli import cli
from me_local.config import load_config, packaged_config_path
from me_local.core.likelihood import UnitScores, bits_per_byte, count_words, fit_weights, split_units
from me_local.engine import Engine, ScoreRequest
from me_local.errors import ContextOverflowError
from me_local.evaluation.stats import wilson
from me_local.evaluation.windows import pieces, windows

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)

# Written for these tests (public domain).
TEXT = ("The river ran low that summer, and the children walked along its bed to the old mill.\n\n"
        "Nobody had worked there for years. The wheel was still, the windows were dark, and the door "
        "hung open on one hinge.\n\nThey went in anyway, because it was hot and the mill was cool.\n")
OTHER = ("A small boat came down the river in the morning. The man in it waved to the children, "
         "and they waved back.\n\nBy noon the wind had changed and the sky over the hills was grey.\n")


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_models):
    m = tiny_models
    path = tmp_path_factory.mktemp("eval") / "models.yaml"
    path.write_text(f"""\
# tiny ensembles for the eval tests
ensembles:
  pair:   # one vocabulary: token granularity
    n_ctx: 256
    members:
      - {{name: one, path: {m['a1']}, weight: 3}}
      - {{name: two, path: {m['a2']}, weight: 1}}
  mixed:  # two vocabularies: word granularity
    n_ctx: 256
    members:
      - name: bpe
        path: {m['a1']}
        weight: 0.4
      - name: spm
        path: {m['s1']}
        weight: 0.6
  small:
    n_ctx: 48
    members:
      - {{name: one, path: {m['a1']}}}
      - {{name: two, path: {m['a2']}}}
""")
    return path


@pytest.fixture(scope="module")
def engine(config):
    eng = Engine(load_config(config))
    yield eng
    eng.close()


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(OTHER)
    return a, b


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def run_json(*args):
    return json.loads(run(*args, "--json").stdout)


# --------------------------------------------------------------------------- eval TEXTFILE


@pytest.mark.parametrize(("ensemble", "granularity"), [("pair", "token"), ("mixed", "word")])
def test_eval_figures_are_the_engines_likelihood_of_the_text(config, engine, files, ensemble, granularity):
    a, _ = files
    out = run_json("eval", "--config", config, "-e", ensemble, a)
    tl = engine.score(ScoreRequest(ensemble=ensemble, text=TEXT))
    names = list(tl.members)
    n_bytes = len(TEXT.encode())
    assert out["bytes"] == n_bytes and out["words"] == count_words(TEXT) == 52 and out["windows"] == 1
    for k, n in enumerate(names):
        m = out["members"][n]
        assert m["log_likelihood"] == pytest.approx(tl.member_logp()[k], rel=1e-6)
        assert m["bits_per_byte"] == pytest.approx(-tl.member_logp()[k] / (n_bytes * LN2), rel=1e-6)
        assert m["perplexity_per_word"] == pytest.approx(math.exp(-tl.member_logp()[k] / 52), rel=1e-6)
    ens = out["ensemble"]
    assert ens["name"] == ensemble and ens["granularity"] == granularity
    assert ens["weights"] == dict(zip(names, tl.weights))
    assert ens["log_likelihood"] == pytest.approx(tl.logp(tl.weights), rel=1e-6)
    assert ens["bits_per_byte"] == pytest.approx(bits_per_byte(tl.logp(tl.weights), n_bytes), rel=1e-6)
    # the mixture is never worse than its worst member, and at word granularity it is no mere average
    assert ens["log_likelihood"] >= min(m["log_likelihood"] for m in out["members"].values())


def test_eval_table_weights_override_and_several_files(config, engine, files, tmp_path):
    a, b = files
    table = run("eval", "--config", config, "-e", "pair", "--weights", "one=1,two=1", a, b).stdout
    out = run_json("eval", "--config", config, "-e", "pair", "--weights", "one=1,two=1", "--out", tmp_path / "o", a, b)
    assert json.loads((tmp_path / "o" / "eval.json").read_text()) == out
    assert out["ensemble"]["weights"] == {"one": 0.5, "two": 0.5}
    ta = engine.score(ScoreRequest(ensemble="pair", text=TEXT))
    tb = engine.score(ScoreRequest(ensemble="pair", text=OTHER))
    assert out["ensemble"]["log_likelihood"] == pytest.approx(ta.logp([0.5, 0.5]) + tb.logp([0.5, 0.5]), rel=1e-6)
    assert [f["path"] for f in out["files"]] == [str(a), str(b)]
    assert out["files"][1]["members"]["two"]["log_likelihood"] == pytest.approx(tb.member_logp()[1], rel=1e-6)
    assert out["bytes"] == len(TEXT.encode()) + len(OTHER.encode())
    assert table.splitlines()[0] == "ensemble pair (token granularity), weights one=0.5 two=0.5"
    row = next(line for line in table.splitlines() if line.startswith("  ensemble "))
    assert f"{out['ensemble']['bits_per_byte']:.4f}" in row
    assert "bits per byte by file" in table and str(b) in table


def test_a_text_longer_than_the_context_is_scored_in_windows_that_fit(config, engine, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(TEXT * 3)
    with pytest.raises(ContextOverflowError):  # whole, it does not fit n_ctx 48
        engine.score(ScoreRequest(ensemble="small", text=TEXT * 3))
    out = run_json("eval", "--config", config, "-e", "small", long)
    assert out["window_tokens"] == 48 - 1 - 8  # n_ctx less the BOS and the margin
    assert out["bytes"] == len((TEXT * 3).encode()) and out["words"] == 156
    # the same windows, scored one by one through the engine
    members = engine.ensemble("small").members

    def count(t):
        return [len(members[0].tokenize_text(t))]

    ws = list(windows(pieces([TEXT * 3]), count, out["window_tokens"]))
    assert out["windows"] == len(ws) > 3 and "".join(ws) == TEXT * 3
    tls = [engine.score(ScoreRequest(ensemble="small", text=w)) for w in ws]
    assert out["members"]["one"]["log_likelihood"] == pytest.approx(sum(t.member_logp()[0] for t in tls), rel=1e-6)
    assert out["ensemble"]["log_likelihood"] == pytest.approx(sum(t.logp(t.weights) for t in tls), rel=1e-6)
    # smaller windows: more of them, and less context for each word, so a lower likelihood
    small = run_json("eval", "--config", config, "-e", "small", "--window", "12", long)
    assert small["windows"] > out["windows"] and small["window_tokens"] == 12
    assert small["members"]["one"]["log_likelihood"] < out["members"]["one"]["log_likelihood"]


# --------------------------------------------------------------------------- eval --task


def task_file(tmp_path):
    lines = [
        {"context": "The river ran low that", "choices": ["summer", "mill", "door"], "answer": 0},
        {"context": "The wheel was still, the windows were", "choices": ["dark", "river", "hinge"], "answer": 0},
        {"question": {"stem": "Where did the children walk?", "choices": [
            {"text": "along the river bed", "label": "A"}, {"text": "over the hills", "label": "B"}]},
         "answerKey": "A"},
        {"question": "What hung open?", "choices": {"text": ["the window", "the door"], "label": ["1", "2"]},
         "answerKey": "2"},
        {"ctx": "They went in anyway, because it was hot and the", "endings": ["mill was cool.", "boat"],
         "label": "0"},
        {"context": "By noon the wind had", "choices": ["changed", "children", "sky"], "answer": 0},
    ]
    p = tmp_path / "task.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


def test_task_accuracy_is_choosing_by_the_engines_scores_with_wilson_intervals(config, engine, tmp_path):
    p = task_file(tmp_path)
    out = run_json("eval", "--config", config, "-e", "mixed", "--task", p)
    assert out["questions"] == 6 and out["shapes"] == {"me-local": 3, "arc": 2, "hellaswag": 1}
    from me_local.evaluation.tasks import read_tasks

    names = ["bpe", "spm"]
    right = {s: {"acc": 0, "acc_norm": 0} for s in [*names, "ensemble"]}
    for q in read_tasks(p):
        tls = [engine.score(ScoreRequest(ensemble="mixed", context=q.context, text=" " + c)) for c in q.choices]
        nb = np.array([len(c.encode()) for c in q.choices])
        for i, s in enumerate([*names, "ensemble"]):
            lp = np.array([t.member_logp()[i] if i < 2 else t.logp(t.weights) for t in tls])
            right[s]["acc"] += int(np.argmax(lp) == q.answer)
            right[s]["acc_norm"] += int(np.argmax(lp / nb) == q.answer)
    for s in [*names, "ensemble"]:
        got = out["ensemble"] if s == "ensemble" else out["members"][s]
        for metric in ("acc", "acc_norm"):
            k = right[s][metric]
            assert got[f"{metric}_correct"] == k and got[metric] == pytest.approx(k / 6)
            assert got[f"{metric}_ci95"] == pytest.approx(list(wilson(k, 6)))
    for metric in ("acc", "acc_norm"):
        d = out["difference"][metric]
        best = max(names, key=lambda n: (right[n][metric], -names.index(n)))
        assert d["best_member"] == best
        assert d["value"] == pytest.approx((right["ensemble"][metric] - right[best][metric]) / 6)
        assert d["ci95"][0] <= d["value"] <= d["ci95"][1]
        assert 0 < d["mcnemar_p"] <= 1 and d["bootstrap"] == {"resamples": 10000, "seed": 0}
    table = run("eval", "--config", config, "-e", "mixed", "--task", p, "--limit", "4").stdout
    assert table.startswith(f"task {p}: 4 questions (2 me-local, 2 arc), each choice scored after the context and ' '")
    assert "ensemble minus the best member" in table


def test_task_delimiter_is_put_between_context_and_choice(config, engine, tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"context": "The river ran low that", "choices": ["summer", " mill"], "answer": 0}) + "\n")
    out = run_json("eval", "--config", config, "-e", "pair", "--task", p, "--delimiter", "")
    tls = [engine.score(ScoreRequest(ensemble="pair", context="The river ran low that", text=c))
           for c in ("summer", " mill")]
    pick = int(np.argmax([t.logp(t.weights) for t in tls]))
    assert out["delimiter"] == "" and out["ensemble"]["acc_correct"] == int(pick == 0)


# --------------------------------------------------------------------------- tune


def test_tune_fits_the_weights_on_the_units_scored_once_and_reports_held_out_figures(config, engine, files):
    a, b = files
    out = run_json("tune", "--config", config, "-e", "mixed", "--holdout", "0.3", "--seed", "5", a, b)
    units = UnitScores.concat([engine.score(ScoreRequest(ensemble="mixed", text=t)).units for t in (TEXT, OTHER)])
    fit_part, held = split_units(units, 0.3, seed=5)
    fit = fit_weights(fit_part)
    assert out["weights"] == pytest.approx({"bpe": fit.weights[0], "spm": fit.weights[1]}, abs=1e-9)
    assert sum(out["weights"].values()) == pytest.approx(1.0)
    assert out["current_weights"] == pytest.approx({"bpe": 0.4, "spm": 0.6})
    hb = int(held.n_bytes.sum())
    h = out["holdout"]
    assert h["units"] == held.n_units and h["bytes"] == hb and h["share"] == 0.3 and h["seed"] == 5
    assert h["members"]["spm"] == pytest.approx(bits_per_byte(float(held.logp[:, 1].sum()), hb), rel=1e-6)
    assert h["current"] == pytest.approx(bits_per_byte(held.total([0.4, 0.6]), hb), rel=1e-6)
    assert h["fitted"] == pytest.approx(bits_per_byte(held.total(fit.weights), hb), rel=1e-6)
    # on the text they were fitted to, the fitted weights beat the current ones and each member alone
    f = out["fit"]
    assert f["units"] == fit_part.n_units and f["converged"]
    assert f["log_likelihood"] >= fit_part.total([0.4, 0.6]) - 1e-9
    assert f["log_likelihood"] >= max(fit_part.logp.sum(axis=0)) - 1e-9
    fb = int(fit_part.n_bytes.sum())
    assert f["current"] == pytest.approx(bits_per_byte(fit_part.total([0.4, 0.6]), fb), rel=1e-6)
    assert f["fitted"] <= min(f["current"], *f["members"].values()) + 1e-9
    assert out["written"] is None
    table = run("tune", "--config", config, "-e", "mixed", "--holdout", "0.3", "--seed", "5", a, b).stdout
    assert f"{out['weights']['spm']:8.4f}" in next(x for x in table.splitlines() if x.strip().startswith("spm "))
    assert "fitted weights" in table and "held out" in table


def test_tune_write_changes_only_the_weights_and_keeps_a_backup(config, files, tmp_path):
    a, b = files
    cfg = tmp_path / "models.yaml"
    original = config.read_text()
    cfg.write_text(original)
    out = run_json("tune", "--config", cfg, "-e", "mixed", "--write", a, b)
    new = cfg.read_text()
    assert out["written"] == str(cfg.resolve()) and out["backup"] == str(cfg.resolve()) + ".bak"
    assert Path(out["backup"]).read_text() == original
    w = out["weights"]
    # the two weight scalars of `mixed` changed; every other byte (comments, other ensembles) is the same
    assert new == original.replace("weight: 0.4\n", f"weight: {round(w['bpe'], 4)}\n", 1).replace(
        "weight: 0.6\n", f"weight: {round(w['spm'], 4)}\n", 1)
    assert [m.weight for m in load_config(cfg).ensembles["mixed"].members] == [round(w["bpe"], 4), round(w["spm"], 4)]
    # again: the first backup is kept, the next one is timestamped
    again = run_json("tune", "--config", cfg, "-e", "pair", "--write", a)
    assert again["backup"] != out["backup"] and again["backup"].endswith(".bak")
    assert Path(out["backup"]).read_text() == original and Path(again["backup"]).read_text() == new
    assert "# tiny ensembles for the eval tests\n" in cfg.read_text()
    text = run("tune", "--config", cfg, "-e", "pair", "--write", a).stdout
    assert f"wrote the fitted weights to {cfg.resolve()} (backup: " in text


def test_tune_write_refuses_the_packaged_file_and_an_unsafe_one_before_scoring(files, tmp_path, config):
    a, _ = files
    r = run("tune", "--config", packaged_config_path(), "--write", a, ok=False)
    assert r.exit_code == 2
    assert "is the models.yaml shipped inside the me-local package" in r.stderr
    assert "copy it to ~/.config/me-local/models.yaml" in r.stderr
    aliased = tmp_path / "aliased.yaml"
    aliased.write_text(config.read_text().replace("  small:\n", "  small: &s\n") + "  again: *s\n")
    r = run("tune", "--config", aliased, "-e", "pair", "--write", a, ok=False)
    assert r.exit_code == 2 and "anchors or aliases" in r.stderr and "set them by hand instead: one: 0.75" in r.stderr
    assert aliased.read_text().endswith("  again: *s\n") and not (tmp_path / "aliased.yaml.bak").exists()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("args", "message"), [
    (["eval"], "nothing to evaluate: give TEXTFILE... (likelihood) or --task FILE.jsonl (accuracy)"),
    (["eval", "{a}", "--task", "{a}"], "give TEXTFILE... or --task FILE, not both"),
    (["eval", "{dir}/missing.txt"], "is not a file; give text files to evaluate"),
    (["eval", "{dir}/empty.txt"], "empty.txt is empty: there is nothing to evaluate"),
    (["eval", "--task", "{dir}/bad.jsonl"], 'bad.jsonl: line 2: "answer" is 3 but there are 2 choices (0 to 1)'),
    (["eval", "--task", "{dir}/missing.jsonl"], "does not exist; check the path"),
    (["eval", "-e", "nope", "{a}"], "no ensemble named 'nope'; choose one of: pair, mixed, small"),
    (["eval", "-e", "pair", "--weights", "one=1,three=2", "{a}"], "ensemble 'pair' has no member 'three'"),
    (["eval", "-e", "pair", "--weights", "one", "{a}"], "write them as name=0.7,name=0.3"),
    (["eval", "-e", "pair", "--window", "400", "{a}"], "--window 400 does not fit the members' context of 256"),
    (["eval", "-e", "mixed", "--granularity", "token", "{a}"], "granularity token needs members that share"),
    (["eval", "--url", "http://127.0.0.1:9", "-e", "pair", "{a}"], "--config is for runs in this process"),
    (["tune", "--url", "http://127.0.0.1:9", "{a}"], "tune runs in this process"),
    (["eval", "-e", "mixed", "{dir}/spm.txt"], "spm.txt: line 3: member 'spm''s tokens do not spell the text byte"),
    (["tune", "-e", "mixed", "{dir}/spm.txt"], "replace it in the text, or evaluate at --granularity token"),
    (["tune", "-e", "pair", "--holdout", "1", "{a}"], "1.0 is not in the range 0<x<1"),
])
def test_mistakes_are_one_line_with_exit_status_2(config, files, tmp_path, args, message):
    a, _ = files
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "spm.txt").write_text("A first line.\n\nThe second paragraph has a \u2581 in it.\n")
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n'
                                        '{"context": "a", "choices": ["b", "c"], "answer": 3}\n')
    argv = [x.format(a=a, dir=tmp_path) for x in args]
    r = run(argv[0], "--config", config, *argv[1:], ok=False)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    if "range" not in message:  # click's own usage errors have their usage lines
        assert r.stderr.startswith("me-local: error: ") and r.stderr.count("\n") == 1


def cli_env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def test_as_a_process_errors_exit_2_without_a_traceback_and_results_exit_0(config, files, tmp_path):
    a, _ = files
    p = subprocess.run([sys.executable, "-m", "me_local.cli", "eval", "--config", str(config), "-e", "pair",
                        "--task", str(a)], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1].startswith(f"me-local: error: {a}: line 1: not JSON")
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "me_local.cli", "--log-level", "error", "eval", "--config", str(config),
                        "-e", "pair", "--json", str(a)], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["windows"] == 1
    assert "scoring" not in p.stderr  # no progress bar when stderr is not a terminal


def test_a_progress_bar_on_a_terminal(config, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(TEXT * 4)
    pid, fd = pty.fork()
    if pid == 0:  # the child: stderr (and stdout) on the terminal, results in a file
        os.environ["PYTHONPATH"] = str(ROOT / "src")
        os.execv(sys.executable, [sys.executable, "-m", "me_local.cli", "--log-level", "error", "eval", "--config",
                                  str(config), "-e", "small", "--json", "--out", str(tmp_path), str(long)])
    seen = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 120)
        assert ready, seen
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        seen += data
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    text = seen.decode(errors="replace")
    assert "scoring" in text and "100%" in text
    assert json.loads((tmp_path / "eval.json").read_text())["windows"] > 1
