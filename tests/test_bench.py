"""`me-local bench`: its statistics, its plan, a short real run on the tiny models
(bench.json, and bench.png when matplotlib is installed), the load-run client
against a fake OpenAI-compatible streaming server and against the real daemon,
and the CPU share that keeps concurrent slots from oversubscribing the cores.
Timings are never asserted; counts, structure and arithmetic are."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from click.testing import CliRunner

from me_local.backends.llama import CpuShare
from me_local.bench import (
    BASELINE,
    PLOT_HINT,
    BenchRunner,
    BenchSettings,
    Summary,
    default_config,
    ensemble_report,
    evaluate_targets,
    format_report,
    format_targets,
    interleave,
    loadrun,
    median,
    mixture_speed,
    paired_ratio,
    percentile,
    plan_cases,
    quantile,
    ratio,
    run_bench,
    vocabularies_shared,
    write_chart,
)
from me_local.bench.loadrun import LoadSettings, SSEDecoder, run_load
from me_local.cli import cli
from me_local.config import load_config

HAS_MPL = importlib.util.find_spec("matplotlib") is not None

# --------------------------------------------------------------------------- statistics


def test_median_and_quantiles_by_linear_interpolation() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([7.0]) == 7.0
    xs = [1.0, 2.0, 3.0, 4.0]
    assert quantile(xs, 0.25) == pytest.approx(1.75)
    assert quantile(xs, 0.75) == pytest.approx(3.25)
    assert quantile(xs, 0.0) == 1.0 and quantile(xs, 1.0) == 4.0
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)
    rng = np.random.default_rng(3)
    for n in (2, 5, 10, 31):
        data = list(rng.normal(size=n))
        for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
            assert quantile(data, q) == pytest.approx(float(np.quantile(data, q)))
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


def test_summary_is_median_with_iqr_spread() -> None:
    s = Summary.of([10.0, 30.0, 20.0, 40.0, 1000.0])
    assert (s.n, s.median, s.q1, s.q3, s.min, s.max) == (5, 30.0, 20.0, 40.0, 10.0, 1000.0)
    assert s.iqr == 20.0  # the outlier moves max, not the spread
    d = s.to_dict()
    assert d == {"median": 30.0, "q1": 20.0, "q3": 40.0, "min": 10.0, "max": 1000.0, "n": 5, "iqr": 20.0}


def test_ratios() -> None:
    assert ratio(90.0, 60.0) == pytest.approx(1.5)
    assert ratio(None, 1.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    # paired: the median of per-repeat ratios, skipping pairs with a missing side
    assert paired_ratio([10.0, 20.0, 30.0], [10.0, 10.0, 10.0]) == pytest.approx(2.0)
    assert paired_ratio([10.0, 20.0, 30.0], [10.0, None, 10.0]) == pytest.approx(2.0)
    assert paired_ratio([1.0], [None]) is None


def test_mixture_speed_is_the_weighted_harmonic_mean_of_singles() -> None:
    assert mixture_speed([100.0, 100.0], [0.5, 0.5]) == pytest.approx(100.0)
    # half the tokens at 10 ms, half at 20 ms: 15 ms a token
    assert mixture_speed([100.0, 50.0], [1.0, 1.0]) == pytest.approx(1000.0 / 15.0)
    assert mixture_speed([100.0, 50.0], [1.0, 0.0]) == pytest.approx(100.0)  # a zero-weight member is never drawn
    assert mixture_speed([100.0, 0.0], [1.0, 1.0]) is None
    assert mixture_speed([100.0], [0.0]) is None


def test_interleaving_rotates_the_order_every_repeat() -> None:
    order = interleave(["a", "b", "c"], 4)
    assert order == [
        (0, "a"), (0, "b"), (0, "c"),
        (1, "b"), (1, "c"), (1, "a"),
        (2, "c"), (2, "a"), (2, "b"),
        (3, "a"), (3, "b"), (3, "c"),
    ]
    keys = ["w", "x", "y", "z"]
    order = interleave(keys, 8)
    for r in range(8):  # every repeat runs every key once
        assert sorted(k for rep, k in order if rep == r) == keys
    for k in keys:  # each key takes each position equally often
        positions = [i % 4 for i, (_, key) in enumerate(order) if key == k]
        assert sorted(positions) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert interleave(keys, 0) == []


# --------------------------------------------------------------------------- plan, ratios, targets


def test_default_plan_shares_one_single_and_one_baseline(smollm_path: Path) -> None:
    config = default_config()
    assert [len(config.get(n).members) for n in ("x2", "x3")] == [2, 3]
    assert all(m.resolve_path() == smollm_path for n in ("x2", "x3") for m in config.get(n).members)
    cases, plans = plan_cases(config, ["x2", "x3"])
    keys = [c.key for c in cases]
    assert keys[0] == f"{BASELINE}:{smollm_path.name}"
    assert sorted(keys[1:]) == sorted(["x2/single:m1", "x2/eval:m1", "x2/ce", "x2/me", "x2/me:word", "x3/ce",
                                       "x3/me", "x3/me:word"])
    by_key = {c.key: c for c in cases}
    assert (by_key["x2/me"].granularity, by_key["x2/me:word"].granularity) == ("token", "word")
    assert plans[0].shared_vocabulary and plans[0].me_word == "x2/me:word"
    # identical members share the measurement, across both ensembles
    assert set(plans[1].single.values()) == {"x2/single:m1"}
    # and one evaluation case (one model file): its member scores the text alone, token by token
    assert set(plans[1].evaluation.values()) == {"x2/eval:m1"} and set(plans[0].evaluation) == {"m1", "m2"}
    assert (by_key["x2/eval:m1"].kind, by_key["x2/eval:m1"].member, by_key["x2/eval:m1"].granularity) == (
        "eval", "m1", "token")
    assert plans[1].weights == pytest.approx([1 / 3] * 3)
    cases, _ = plan_cases(config, ["x2"], baseline=False)
    assert {c.kind for c in cases} == {"engine", "eval"}
    cases, plans = plan_cases(config, ["x2"], baseline=False, evaluation=False)
    assert all(c.kind == "engine" for c in cases) and plans[0].evaluation == {}


def _case(mode: str, speeds: list[float], ttfts: list[float], prompt_tokens: int | None = None) -> dict[str, Any]:
    runs: list[dict[str, Any]] = [{"repeat": r, "tokens_per_s": s, "ttft_s": t}
                                  for r, (s, t) in enumerate(zip(speeds, ttfts))]
    if prompt_tokens is not None:
        for r in runs:
            r["prompt_tokens"] = prompt_tokens
    return {"mode": mode, "runs": runs, "tokens_per_s": Summary.of(speeds).to_dict(),
            "ttft_ms": Summary.of([t * 1000 for t in ttfts]).to_dict()}


def _eval_case(speeds: list[float], scored: int = 499) -> dict[str, Any]:
    runs = [{"repeat": r, "tokens_per_s": s, "total_s": scored / s, "scored_tokens": scored, "rows_per_pass": 341}
            for r, s in enumerate(speeds)]
    return {"kind": "eval", "mode": "eval", "label": "x2 eval m1", "runs": runs,
            "tokens_per_s": Summary.of(speeds).to_dict(), "scored_tokens": scored, "rows_per_pass": 341}


def test_ensemble_report_ratios(smollm_path: Path) -> None:
    config = default_config()
    _, plans = plan_cases(config, ["x2"])
    cases = {
        f"{BASELINE}:{smollm_path.name}": _case(BASELINE, [100.0, 100.0, 100.0], [0.5, 0.5, 0.5]),
        "x2/single:m1": _case("single", [120.0, 100.0, 110.0], [0.5, 0.4, 2.0], prompt_tokens=500),
        "x2/eval:m1": _eval_case([300.0, 600.0, 440.0]),
        "x2/ce": _case("ce", [60.0, 50.0, 55.0], [1.0, 1.2, 1.1]),
        "x2/me": _case("me", [90.0, 80.0, 88.0], [0.5, 0.6, 0.55]),
    }
    report = ensemble_report(plans[0], cases, config.get("x2"))
    r, p = report["ratios"], report["paired_ratios"]
    # evaluation against the member's own generation: medians 440 / 110, paired 300/120, 600/100, 440/110
    assert r["eval/generation"] == {"m1": pytest.approx(4.0), "m2": pytest.approx(4.0)}
    assert p["eval/generation"]["m1"] == pytest.approx(4.0)  # median of 2.5, 6.0, 4.0
    ev = report["evaluation"]["m1"]
    assert (ev["case"], ev["single"], ev["scored_tokens"], ev["rows_per_pass"]) == ("x2/eval:m1", "x2/single:m1",
                                                                                    499, 341)
    assert ev["prompt_tokens_per_s"] == pytest.approx(1000.0)  # median of 500/0.5, 500/0.4, 500/2.0
    assert ev["prompt/generation"] == pytest.approx(1000.0 / 110.0)
    assert r["me/ce"] == pytest.approx(88.0 / 55.0)
    assert r["me/single"] == pytest.approx(88.0 / 110.0)
    assert r["ce_ttft/me_ttft"] == pytest.approx(1100.0 / 550.0)
    assert r["single/" + BASELINE] == {"m1": pytest.approx(1.1), "m2": pytest.approx(1.1)}
    assert p["me/ce"] == pytest.approx(median([90 / 60, 80 / 50, 88 / 55]))
    assert p["me/single"] == pytest.approx(median([90 / 120, 80 / 100, 88 / 110]))

    result = {"settings": {"prompt_tokens": 500}, "ensembles": {"x2": report},
              "memory": {"model": smollm_path.name, "n_ctx": 4096, "ratio_2_to_1": 1.4}}
    targets = {t.name: t for t in evaluate_targets(result)}
    assert len(targets) == 6  # one baseline check and one evaluation check although both members map to them
    ev_target = targets["evaluation (m1) vs its generation, tokens/s"]
    assert (ev_target.value, ev_target.op, ev_target.threshold, ev_target.passed) == (
        pytest.approx(4.0), ">=", 5.0, False)
    assert ev_target.note == "prompt processing alone: 9.09x generation"
    assert "[MISS] evaluation (m1) vs its generation, tokens/s: 4.00x (target >= 5x)" in format_targets(
        list(targets.values()))
    assert targets["x2: me vs ce tokens/s, 2 members"].passed is True  # 1.6 >= 1.35
    assert targets["x2: me vs single tokens/s, 2 members"].passed is True  # 0.8 >= 0.75
    assert targets["x2: me TTFT vs ce TTFT, 2 members"].value == pytest.approx(0.5)
    assert targets["x2: me TTFT vs ce TTFT, 2 members"].passed is True
    assert next(t for n, t in targets.items() if n.startswith("single (m1)")).passed is True  # 1.1 >= 0.95
    mem = next(t for n, t in targets.items() if n.startswith("resident memory"))
    assert mem.passed is False  # 1.4 > 1.3


def test_plan_reads_which_ensembles_share_a_vocabulary(tiny_models: dict[str, Path],
                                                       write_config: Callable[[str], Path]) -> None:
    m = tiny_models
    path = write_config(TINY_WORDS.format(a1=m["a1"], s1=m["s1"]) + f"""
  seeds:
    members:
      - {{name: one, path: {m['a1']}}}
      - {{name: two, path: {m['a2']}}}
""")
    config = load_config(path)
    assert vocabularies_shared(config, ["words", "seeds"]) == {"words": False, "seeds": True}
    cases, plans = plan_cases(config, ["words", "seeds"], baseline=False)
    assert [c.key for c in cases if c.ensemble == "words"] == [
        "words/single:bpe", "words/eval:bpe", "words/single:spm", "words/eval:spm", "words/me"]
    assert next(c for c in cases if c.key == "words/me").granularity == "word"
    assert [c.key for c in cases if c.ensemble == "seeds"] == [
        "seeds/single:one", "seeds/eval:one", "seeds/single:two", "seeds/eval:two", "seeds/ce", "seeds/me",
        "seeds/me:word"]
    assert [p.shared_vocabulary for p in plans] == [False, True]


def _word_case(mode: str, byte_speeds: list[float], ttfts: list[float]) -> dict[str, Any]:
    case = _case(mode, [b / 4 for b in byte_speeds], ttfts)
    for r, b in zip(case["runs"], byte_speeds):
        r["bytes_per_s"] = b
    case["bytes_per_s"] = Summary.of(byte_speeds).to_dict()
    return case


def test_word_level_report_compares_bytes_with_each_member_and_their_harmonic_mean(
        tiny_models: dict[str, Path], write_config: Callable[[str], Path]) -> None:
    config = load_config(write_config(TINY_WORDS.format(a1=tiny_models["a1"], s1=tiny_models["s1"])))
    cases, plans = plan_cases(config, ["words"])
    plan = plans[0]
    assert not plan.shared_vocabulary and plan.me_word is None
    base_a, base_s = (f"{BASELINE}:{tiny_models['a1'].name}", f"{BASELINE}:{tiny_models['s1'].name}#1")
    cases_by_key = {
        base_a: _word_case(BASELINE, [400.0, 400.0, 400.0], [0.2, 0.2, 0.2]),
        base_s: _word_case(BASELINE, [200.0, 200.0, 200.0], [0.4, 0.4, 0.4]),
        "words/single:bpe": _word_case("single", [400.0, 380.0, 420.0], [0.2, 0.25, 0.2]),
        "words/single:spm": _word_case("single", [200.0, 180.0, 220.0], [0.4, 0.5, 0.3]),
        "words/me": _word_case("me", [250.0, 240.0, 260.0], [0.3, 0.3, 0.35]),
        "words/eval:bpe": _eval_case([2000.0, 2000.0, 2000.0]),
        "words/eval:spm": _eval_case([1000.0, 1000.0, 1000.0]),
    }
    assert {c.key for c in cases} == set(cases_by_key)
    report = ensemble_report(plan, cases_by_key, config.get("words"), "not run: no shared vocabulary")
    r, p = report["ratios"], report["paired_ratios"]
    harmonic = 1.0 / (0.25 / 400.0 + 0.75 / 200.0)  # weights 1 and 3
    assert report["granularity"] == "word" and report["cases"]["ce"] is None
    assert report["ce"] == "not run: no shared vocabulary"
    assert report["single_mixture_bytes_per_s"] == pytest.approx(harmonic)
    assert r["me/ce"] is None
    assert r["me/single_mixture_bytes"] == pytest.approx(250.0 / harmonic)
    assert r["me/single_bytes"] == {"bpe": pytest.approx(250.0 / 400.0), "spm": pytest.approx(250.0 / 200.0)}
    assert r["me_ttft/slower_single_ttft"] == pytest.approx(300.0 / 400.0)  # spm's median TTFT is the slower
    per_rep = [250.0 / (1 / (0.25 / 400 + 0.75 / 200)), 240.0 / (1 / (0.25 / 380 + 0.75 / 180)),
               260.0 / (1 / (0.25 / 420 + 0.75 / 220))]
    assert p["me/single_mixture_bytes"] == pytest.approx(median(per_rep))
    assert p["me_ttft/slower_single_ttft"] == pytest.approx(median([0.3 / 0.4, 0.3 / 0.5, 0.35 / 0.3]))
    assert "me/single" not in r  # tokens of two vocabularies are not compared
    # each member's evaluation against its own generation, in its own tokens (bytes/4 in _word_case)
    assert r["eval/generation"] == {"bpe": pytest.approx(2000.0 / 100.0), "spm": pytest.approx(1000.0 / 50.0)}

    targets = {t.name: t for t in evaluate_targets({"settings": {"prompt_tokens": 500},
                                                     "ensembles": {"words": report}})}
    speed = targets["words: word-level me vs the members' harmonic mean, bytes/s"]
    ttft = targets["words: word-level me TTFT vs the slower member's"]
    assert (speed.op, speed.threshold, speed.passed) == (">=", 0.85, True)  # 250 / 228.6
    assert (ttft.op, ttft.threshold, ttft.passed) == ("<=", 1.1, True)
    assert not any("vs ce" in name for name in targets)


# --------------------------------------------------------------------------- a real run on tiny models

TINY_WORDS = """
ensembles:
  words:
    n_ctx: 128
    members:
      - {{name: bpe, path: {a1}, weight: 1, n_threads: 1}}
      - {{name: spm, path: {s1}, weight: 3, n_threads: 1}}
"""

TINY = """
ensembles:
  pair:
    n_ctx: 128
    members:
      - {{name: one, path: {a1}, weight: 1, n_threads: 1}}
      - {{name: two, path: {a2}, weight: 1, n_threads: 1}}
"""


@pytest.fixture
def tiny_bench_config(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(TINY.format(a1=tiny_models["a1"], a2=tiny_models["a2"]))
    return path


def test_short_bench_on_tiny_models_writes_a_valid_bench_json(tiny_bench_config: Path, tmp_path: Path) -> None:
    config = load_config(tiny_bench_config)
    settings = BenchSettings(tokens=6, repeats=2, prompt_tokens=12, memory=True)
    runner = BenchRunner(config, ["pair"], settings)
    steps: list[str] = []
    result, written = run_bench(runner, tmp_path / "out", progress=steps.append)
    assert len(steps) == runner.total_steps == 9 * 3  # (warm-up + 2 repeats) x 9 cases

    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert written[0] == tmp_path / "out" / "bench.json"
    assert data["settings"]["spread"] == "iqr"
    assert data["machine"]["cores"] >= 1
    assert set(data["cases"]) == {
        "pair/single:one", "pair/single:two", "pair/ce", "pair/me", "pair/me:word", "pair/eval:one", "pair/eval:two",
        f"{BASELINE}:{Path(config.get('pair').members[0].path).name}",
        f"{BASELINE}:{Path(config.get('pair').members[1].path).name}#1",
    }
    # evaluation: each member alone scored a prompt text (its tokens, the BOS excluded) once per repeat
    from me_local.engine import Engine

    engine = Engine(config)
    try:
        bos = {m.name: len(m.raw_prompt("")) for m in engine.ensemble("pair").members}
    finally:
        engine.close()
    for member in ("one", "two"):
        ev = data["cases"].pop(f"pair/eval:{member}")
        assert (ev["kind"], ev["mode"], ev["member"], ev["granularity"]) == ("eval", "eval", member, "token")
        assert sorted(r["repeat"] for r in ev["runs"]) == [0, 1]
        for r in ev["runs"]:  # the prompt text, as the generations' prompts (about 12 tokens with the BOS)
            assert abs(r["scored_tokens"] + bos[member] - 12) <= 3
            assert r["tokens_per_s"] == pytest.approx(r["scored_tokens"] / r["total_s"])
            assert r["mean_logprob"] < 0 and r["rows_per_pass"] >= 1
        s = ev["tokens_per_s"]
        assert s["n"] == 2 and s["min"] <= s["median"] <= s["max"]
        e = data["ensembles"]["pair"]["evaluation"][member]
        assert e["case"] == f"pair/eval:{member}" and e["single"] == f"pair/single:{member}"
        assert e["eval/generation"] == pytest.approx(
            s["median"] / data["cases"][f"pair/single:{member}"]["tokens_per_s"]["median"])
        assert data["ensembles"]["pair"]["ratios"]["eval/generation"][member] == e["eval/generation"]
        assert e["prompt/generation"] > 0
    ev_targets = [t for t in data["targets"] if t["name"].startswith("evaluation (")]
    assert [(t["name"], t["op"], t["threshold"]) for t in ev_targets] == [
        ("evaluation (one) vs its generation, tokens/s", ">=", 5.0),
        ("evaluation (two) vs its generation, tokens/s", ">=", 5.0)]
    assert all(t["note"].startswith("prompt processing alone: ") for t in ev_targets)
    text = format_report(result)
    assert "evaluation: the prompt text (~" in text and "pair eval one" in text and "pair eval two" in text
    for key, case in data["cases"].items():
        assert sorted(r["repeat"] for r in case["runs"]) == [0, 1], key
        for metric in ("tokens_per_s", "ttft_ms"):
            s = case[metric]
            assert s["n"] == 2 and s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"], (key, metric)
        for r in case["runs"]:
            # llama-cpp-python may overshoot max_tokens while it holds back a partial UTF-8
            # character (the tiny models emit many); the engine never does
            assert 1 <= r["generated_tokens"] <= (6 if case["kind"] == "engine" else 12)
            assert abs(r["prompt_tokens"] - 12) <= 3
    # per-member figures are the engine's own counts
    for r in data["cases"]["pair/me"]["runs"]:
        selected = sum(m["selected"] for m in r["members"])
        assert selected in (r["generated_tokens"], r["generated_tokens"] + 1)  # + the step that drew EOS
        assert all(m["catchup_tokens"] <= r["generated_tokens"] for m in r["members"])
    for r in data["cases"]["pair/me"]["runs"]:
        assert r.get("granularity", "token") == "token"
    for r in data["cases"]["pair/me:word"]["runs"]:  # the same members, word by word
        assert r["granularity"] == "word"
        assert sum(m["generated_tokens"] for m in r["members"]) == r["generated_tokens"]
        assert sum(m["selected"] for m in r["members"]) == r["words"] <= r["generated_tokens"] + 1
    for r in data["cases"]["pair/ce"]["runs"]:
        assert r["members"][0]["selected"] == r["members"][1]["selected"]
    for r in data["cases"]["pair/single:two"]["runs"]:
        assert next(m["selected"] for m in r["members"]) == 0
    ens = data["ensembles"]["pair"]
    me, ce = data["cases"]["pair/me"], data["cases"]["pair/ce"]
    assert ens["ratios"]["me/ce"] == pytest.approx(me["tokens_per_s"]["median"] / ce["tokens_per_s"]["median"])
    assert ens["ratios"]["ce_ttft/me_ttft"] == pytest.approx(ce["ttft_ms"]["median"] / me["ttft_ms"]["median"])
    word = data["cases"]["pair/me:word"]
    assert ens["ratios"]["me_word/me_token"] == pytest.approx(word["tokens_per_s"]["median"]
                                                              / me["tokens_per_s"]["median"])
    assert ens["granularity"] == "token" and ens["cases"]["me_word"] == "pair/me:word"
    assert set(ens["ratios"]["single/" + BASELINE]) == {"one", "two"}
    mem = data["memory"]
    assert set(mem["rss_mib"]) == {"0", "1", "2"}
    assert mem["rss_mib"]["2"] > mem["rss_mib"]["0"] and mem["ratio_2_to_1"] > 0.5
    assert next(t["name"] for t in data["targets"]).startswith("single (one)")
    png = tmp_path / "out" / "bench.png"
    assert png.exists() == HAS_MPL


def test_short_bench_across_vocabularies_runs_word_level_me_and_no_ce(
        tiny_models: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path) -> None:
    config = load_config(write_config(TINY_WORDS.format(a1=tiny_models["a1"], s1=tiny_models["s1"])))
    runner = BenchRunner(config, ["words"], BenchSettings(tokens=8, repeats=2, prompt_tokens=12, memory=False))
    result, _ = run_bench(runner, tmp_path / "out")
    base_a, base_s = (f"{BASELINE}:{tiny_models['a1'].name}", f"{BASELINE}:{tiny_models['s1'].name}#1")
    assert set(result["cases"]) == {"words/single:bpe", "words/single:spm", "words/me", base_a, base_s,
                                    "words/eval:bpe", "words/eval:spm"}
    # each member scores in its own vocabulary: as many tokens as its own prompt less its BOS, at most
    for member in ("bpe", "spm"):
        ev = result["cases"].pop(f"words/eval:{member}")
        assert 0 < ev["scored_tokens"] <= result["cases"][f"words/single:{member}"]["prompt_tokens"]
    for key, case in result["cases"].items():
        assert case["bytes_per_s"]["n"] == 2, key  # every case has a text speed
        for r in case["runs"]:
            assert r["generated_bytes"] >= 1
    me = result["cases"]["words/me"]
    assert me["granularity"] == "word"
    for r in me["runs"]:
        assert sum(m["generated_tokens"] for m in r["members"]) == r["generated_tokens"]
    # each baseline got the prompt in its own vocabulary: as many tokens as its member alone
    assert result["cases"][base_a]["prompt_tokens"] == result["cases"]["words/single:bpe"]["prompt_tokens"]
    assert result["cases"][base_s]["prompt_tokens"] == result["cases"]["words/single:spm"]["prompt_tokens"]
    ens = result["ensembles"]["words"]
    assert ens["granularity"] == "word" and ens["cases"]["ce"] is None
    assert ens["ce"].startswith("not run: mode ce needs members that share a vocabulary (members 'bpe'")
    assert set(ens["ratios"]) == {"me/ce", "me/single_mixture_bytes", "me/single_bytes",
                                  "me_ttft/slower_single_ttft", "single/" + BASELINE, "eval/generation"}
    assert set(ens["ratios"]["eval/generation"]) == {"bpe", "spm"}
    assert set(ens["ratios"]["me/single_bytes"]) == {"bpe", "spm"}
    assert ens["ratios"]["me/single_mixture_bytes"] > 0 and ens["ratios"]["me_ttft/slower_single_ttft"] > 0
    names = [t["name"] for t in result["targets"]]
    assert "words: word-level me vs the members' harmonic mean, bytes/s" in names
    assert "words: word-level me TTFT vs the slower member's" in names
    assert {t["threshold"] for t in result["targets"] if t["name"].startswith("words:")} == {0.85, 1.1}
    assert not any("me vs ce" in n for n in names)

    text = format_report(result)
    assert "words (2 members), word by word (the members' vocabularies differ), in bytes/s" in text
    assert "ce: not run: mode ce needs members that share a vocabulary" in text
    assert "me/bpe" in text and "me/spm" in text


def test_bench_command_across_vocabularies(tiny_models: dict[str, Path], write_config: Callable[[str], Path],
                                           tmp_path: Path) -> None:
    path = write_config(TINY_WORDS.format(a1=tiny_models["a1"], s1=tiny_models["s1"]))
    result = CliRunner().invoke(cli, ["bench", "--config", str(path), "--ensemble", "words", "--tokens", "4",
                                      "--repeats", "1", "--prompt-tokens", "10", "--out", str(tmp_path),
                                      "--no-memory", "--no-baseline"])
    assert result.exit_code == 0, result.output
    assert "words me (word)" in result.output
    assert "words eval bpe" in result.output and "words eval spm" in result.output
    assert "evaluation (spm) vs its generation, tokens/s" in result.output and "(target >= 5x)" in result.output
    assert "ce: not run" in result.output
    assert "word-level me vs the members' harmonic mean, bytes/s" in result.output
    assert "(target >= 0.85x)" in result.output and "(target <= 1.1x)" in result.output


@pytest.mark.skipif(not HAS_MPL, reason=f"matplotlib is not installed ({PLOT_HINT})")
def test_chart_is_a_png(tmp_path: Path) -> None:
    cases = {
        "a/single:x": dict(_case("single", [100.0, 110.0], [0.1, 0.2]), label="a single x"),
        "a/me": dict(_case("me", [80.0, 85.0], [0.1, 0.1]), label="a me"),
    }
    result = {"cases": cases, "machine": {"cores": 2, "date": "2026-11-22"}, "models": {"m.gguf": {}},
              "settings": {"prompt_tokens": 10, "tokens": 5, "repeats": 2}}
    assert write_chart(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_command_on_tiny_models(tiny_bench_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(cli, ["bench", "--config", str(tiny_bench_config), "--ensemble", "pair",
                                      "--tokens", "4", "--repeats", "1", "--prompt-tokens", "10",
                                      "--out", str(out), "--no-memory", "--no-baseline", "--no-eval"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert set(data["cases"]) == {"pair/single:one", "pair/single:two", "pair/ce", "pair/me", "pair/me:word"}
    assert "evaluation" not in result.output and data["ensembles"]["pair"]["evaluation"] == {}
    assert "memory" not in data
    assert "pair (2 members): me/ce" in result.output
    assert "me word by word / token by token, tokens/s" in result.output
    assert f"wrote {out / 'bench.json'}" in result.output
    if HAS_MPL:
        assert (out / "bench.png").exists()
    else:
        assert PLOT_HINT in result.output


def test_bench_command_reports_a_bad_ensemble(tiny_bench_config: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "--config", str(tiny_bench_config), "--ensemble", "nope",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no ensemble named 'nope'" in result.output


# --------------------------------------------------------------------------- the load run


def test_sse_decoder() -> None:
    d = SSEDecoder()
    assert d.feed(": keep-alive\n") is None
    assert d.feed("data: {\"a\": 1}\r\n") is None
    assert d.feed("\r\n") == '{"a": 1}'
    assert d.feed("\n") is None  # a blank line with no data is no event
    d.feed("data: line one\n")
    d.feed("data:line two\n")
    assert d.feed("\n") == "line one\nline two"
    d.feed("data: [DONE]")
    assert d.flush() == "[DONE]"


def _chunk(content: str | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    obj: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": []}
    if content is not None or finish is not None:
        delta = {"content": content} if content is not None else {}
        obj["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def fake_openai_app(seen: list[dict[str, Any]]) -> web.Application:
    """Streams max_tokens one-token deltas. By request number (from the prompt): n % 5 == 3
    gets a 503, n % 5 == 4 is cut off after two tokens, n == 99 stalls after one token."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "default"}, {"id": "default/m1"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("Authorization")})
        n = int(body["messages"][0]["content"].split()[1].rstrip("."))
        if n % 5 == 3:
            return web.json_response({"error": {"message": "busy", "type": "server_error", "code": "queue_full"}},
                                     status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}).encode()
                         + b"\n\n")
        limit = 2 if n % 5 == 4 else body["max_tokens"]
        for i in range(limit):
            await asyncio.sleep(0.002)
            await resp.write(_chunk(f" t{i}"))
            if n == 99:
                await asyncio.sleep(30)
        if n % 5 == 4:
            return resp  # the connection ends without a finish chunk or [DONE]
        await resp.write(_chunk(finish="length"))
        await resp.write(_chunk(usage={"prompt_tokens": 9, "completion_tokens": limit, "total_tokens": 9 + limit}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.fixture
def fake_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The fake app on a free loopback port, served by a background thread's event loop
    (so both async tests and click's runner, which runs its own loop, can use it)."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake_openai_app(seen), handler_cancellation=True, shutdown_timeout=1)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_load_run_counts_tokens_errors_and_cancellations(fake_server: tuple[str, list[Any]]) -> None:
    url, seen = fake_server
    done: list[int] = []
    report = await run_load(LoadSettings(url=url, clients=3, requests=10, tokens=5, api_key="k"),
                            progress=lambda: done.append(1))
    assert len(done) == 10 and len(seen) == 10
    assert report["model"] == "default"  # the first ensemble /v1/models lists
    assert all(s["body"]["stream"] is True and s["body"]["model"] == "default" for s in seen)
    assert all(s["body"]["stream_options"] == {"include_usage": True} for s in seen)
    assert all(s["auth"] == "Bearer k" for s in seen)
    prompts = [s["body"]["messages"][0]["content"] for s in seen]
    assert len(set(prompts)) == 10  # no request can reuse another's cached prompt
    again = await run_load(LoadSettings(url=url, clients=1, requests=1, tokens=5))
    assert again["completed"] == 1
    assert seen[-1]["body"]["messages"][0]["content"] not in prompts  # nor one from an earlier run
    assert "seed" not in seen[0]["body"]
    await run_load(LoadSettings(url=url, clients=1, requests=2, tokens=5, seed=7))
    assert [s["body"]["seed"] for s in seen[-2:]] == [7, 8]
    assert (report["completed"], report["errors"], report["cancelled"]) == (6, 2, 2)  # 3, 8 fail; 4, 9 cut off
    assert report["first_error"].startswith("HTTP 503")
    assert report["tokens"] == 6 * 5 + 2 * 2
    assert report["aggregate_tokens_per_s"] == pytest.approx(report["tokens"] / report["wall_s"], rel=0.05)
    assert report["finish_reasons"] == {"length": 6}
    for key in ("ttft_ms", "token_latency_ms"):
        p = report[key]
        assert set(p) == {"p50", "p95", "p99"} and 0 < p["p50"] <= p["p95"] <= p["p99"]
    assert report["per_request_tokens_per_s"]["n"] == 6


async def test_load_run_cancels_a_stalled_stream(fake_server: tuple[str, list[Any]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = fake_server
    settings = LoadSettings(url=url, clients=1, requests=1, tokens=3, model="tiny", timeout=0.5)
    report = await run_load(settings)
    assert report["model"] == "tiny"
    assert (report["completed"], report["errors"], report["cancelled"]) == (1, 0, 0)
    # request number 99 stalls after one token: make the only request that one
    real = loadrun.prompt_text
    monkeypatch.setattr(loadrun, "prompt_text", lambda index, n, run: real(99, n, run))
    report = await run_load(settings)
    assert (report["completed"], report["errors"], report["cancelled"]) == (0, 0, 1)


def test_bench_server_command(fake_server: tuple[str, list[Any]], tmp_path: Path) -> None:
    url, _ = fake_server
    result = CliRunner().invoke(cli, ["bench", "--server", url, "--clients", "2", "--requests", "3",
                                      "--tokens", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench-load.json").read_text())
    assert (report["completed"], report["errors"], report["tokens"]) == (3, 0, 12)
    assert "aggregate" in result.output and "p95" in result.output


def test_bench_server_command_says_when_nothing_answers(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(cli, ["bench", "--server", f"http://127.0.0.1:{port}", "--requests", "2",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "is `me-local serve` running there?" in result.output


def test_load_run_against_the_real_daemon(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("me_local.server")
    from me_local.server import ServerSettings

    from .server_helpers import LiveServer, engine_loader, write_tiny_config

    config = write_tiny_config(tmp_path, tiny_models)
    live = LiveServer(ServerSettings(port=0), engine_loader(config)).start()
    try:
        report = asyncio.run(run_load(LoadSettings(url=live.url, clients=4, requests=6, tokens=5, model="pair",
                                                   prompt_tokens=20)))
    finally:
        live.stop()
    assert (report["completed"], report["errors"], report["cancelled"]) == (6, 0, 0), report["first_error"]
    assert 6 <= report["tokens"] <= 30  # usage.completion_tokens: up to 5 each (EOS may end one early)
    assert report["ttft_ms"]["p50"] > 0


# --------------------------------------------------------------------------- the CPU share


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _on_threads(k: int, fn: Callable[[], int]) -> list[int]:
    """fn on k threads that are all alive at once (a finished thread's id may be reused)."""
    out: list[int] = []
    called = threading.Barrier(k + 1)
    release = threading.Event()

    def work() -> None:
        out.append(fn())
        called.wait()
        release.wait()

    threads = [threading.Thread(target=work) for _ in range(k)]
    for t in threads:
        t.start()
    called.wait()
    release.set()
    for t in threads:
        t.join()
    return out


def test_cpu_share_divides_cores_between_concurrent_generations() -> None:
    clock = FakeClock()
    share = CpuShare(cores=2, window=0.25, clock=clock)
    assert share.threads_for(2) == 2  # alone: everything it asks for
    assert share.threads_for(2) == 2  # the same thread again (a slot's members take turns): still alone
    assert _on_threads(1, lambda: share.threads_for(2)) == [1]  # a second generation: one core each
    assert share.active == 2
    assert share.threads_for(2) == 1
    clock.t += 0.3  # the other generation stopped decoding
    assert share.threads_for(2) == 2
    assert share.active == 1
    assert share.threads_for(1) == 1  # never more than asked
    big = CpuShare(cores=8, clock=clock)
    assert sorted(_on_threads(2, lambda: big.threads_for(8))) == [4, 8]  # the first alone, then two
    assert big.threads_for(8) == 2  # 8 cores, 3 generations
    crowded = CpuShare(cores=2, clock=clock)
    _on_threads(4, lambda: crowded.threads_for(2))
    assert crowded.threads_for(2) == 1  # at least one thread


def test_concurrent_slots_decode_with_a_share_of_the_threads(tiny_models: dict[str, Path]) -> None:
    from llama_cpp import llama_cpp as L

    from me_local.backends.llama import ContextSettings, LlamaMember, ModelStore

    store = ModelStore(cpu=CpuShare(cores=2, window=60.0))
    model = store.acquire(tiny_models["a1"])
    a, b = (LlamaMember(n, model, ContextSettings(n_ctx=64, n_threads=2)) for n in ("a", "b"))
    try:
        a.evaluate([1, 2, 3])
        assert L.llama_n_threads(a._ctx) == 2  # alone: the threads it asked for
        assert _on_threads(1, lambda: (b.evaluate([1, 2, 3]), L.llama_n_threads(b._ctx))[1]) == [1]
        a.evaluate([4])
        assert L.llama_n_threads(a._ctx) == 1  # another generation decoded within the window
    finally:
        a.close()
        b.close()
        store.release(model)


def test_a_short_openmp_spin_is_the_default_and_a_users_setting_wins() -> None:
    import os
    import subprocess
    import sys

    code = ("import os, me_local.runtime as R; R.prepare(); import me_local.backends.llama as B; "
            "print(os.environ['GOMP_SPINCOUNT'], B.GOMP_SPINCOUNT)")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["300", "300"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "5000"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5000", "300"]


def test_cuda_graphs_are_off_unless_asked_for():
    """me's catch-up batches change shape every step, which makes llama.cpp re-capture
    CUDA graphs; me-local turns them off before llama_cpp loads (docs/gpu.md)."""
    import os

    from me_local.backends.llama import cuda_graphs_wanted

    assert cuda_graphs_wanted({}) is False
    assert cuda_graphs_wanted({"ME_LOCAL_CUDA_GRAPHS": "1"}) is True
    if "ME_LOCAL_CUDA_GRAPHS" not in os.environ:
        assert os.environ.get("GGML_CUDA_DISABLE_GRAPHS") == "1"
