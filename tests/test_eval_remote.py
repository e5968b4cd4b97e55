"""``me-local eval --url``: the same figures from a running daemon (its completions echo and
tokenizer routes) as in this process, on tiny real models (a1, a2: one vocabulary without a
BOS; s1: another vocabulary, with a BOS), and the cases it refuses."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from me_local.cli import cli
from me_local.server import ServerSettings

from .server_helpers import LiveServer, engine_loader
from .test_eval_cli import OTHER, TEXT, task_file

KEY = "sesame"


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_models):
    m = tiny_models
    path = tmp_path_factory.mktemp("remote") / "models.yaml"
    path.write_text(f"""\
ensembles:
  pair:
    n_ctx: 256
    members:
      - {{name: one, path: {m['a1']}, weight: 3, n_threads: 1}}
      - {{name: two, path: {m['a2']}, weight: 1, n_threads: 1}}
  mixed:
    n_ctx: 256
    members:
      - {{name: bpe, path: {m['a1']}, weight: 0.4, n_threads: 1}}
      - {{name: spm, path: {m['s1']}, weight: 0.6, n_threads: 1}}
  small:
    n_ctx: 48
    members:
      - {{name: one, path: {m['a1']}, n_threads: 1}}
      - {{name: spm, path: {m['s1']}, n_threads: 1}}
""")
    return path


@pytest.fixture(scope="module")
def live(config):
    server = LiveServer(ServerSettings(port=0, api_key=KEY), engine_loader(config)).start()
    yield server
    server.stop()


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(OTHER * 3)
    return a, b


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def both(config, live, *args):
    """The same eval in this process and through the daemon."""
    here = json.loads(run("eval", "--config", config, *args, "--json").stdout)
    there = json.loads(run("eval", "--url", live.url, "--api-key", KEY, *args, "--json").stdout)
    return here, there


def assert_same(here, there, tol=1e-4):
    for name, m in here["members"].items():
        for k, v in m.items():
            assert there["members"][name][k] == pytest.approx(v, rel=tol), (name, k)
    for k in ("log_likelihood", "bits_per_byte", "perplexity_per_word"):
        assert there["ensemble"][k] == pytest.approx(here["ensemble"][k], rel=tol), k
    assert there["ensemble"]["weights"] == pytest.approx(here["ensemble"]["weights"])
    assert there["ensemble"]["granularity"] == here["ensemble"]["granularity"]


@pytest.mark.parametrize("ensemble", ["pair", "mixed"])
def test_texts_through_the_daemon_give_the_in_process_figures(config, live, files, ensemble):
    a, b = files
    here, there = both(config, live, "-e", ensemble, a, b)
    assert_same(here, there)
    assert there["windows"] == here["windows"] == 3  # b.txt is longer than one window of 247 tokens


def test_long_texts_are_cut_into_the_same_windows(config, live, files):
    _, b = files
    here, there = both(config, live, "-e", "small", b)
    assert here["windows"] > 3 and there["windows"] == here["windows"]
    assert_same(here, there)


def test_weights_and_granularity_go_to_the_daemon(config, live, files):
    a, _ = files
    here, there = both(config, live, "-e", "pair", "--weights", "one=1,two=1", a)
    assert_same(here, there)
    assert there["ensemble"]["weights"] == {"one": 0.5, "two": 0.5}
    here, there = both(config, live, "-e", "pair", "--granularity", "word", a)
    assert_same(here, there)
    assert there["ensemble"]["granularity"] == "word"


def test_a_task_through_the_daemon_at_token_granularity(config, live, tmp_path):
    p = task_file(tmp_path)
    here, there = both(config, live, "-e", "pair", "--task", p)
    for s in ("one", "two"):
        assert there["members"][s] == here["members"][s]
    assert {k: v for k, v in there["ensemble"].items()} == here["ensemble"]
    assert there["difference"] == here["difference"]


def test_what_the_daemon_cannot_do_is_refused_in_one_line(config, live, files, tmp_path):
    a, _ = files
    r = run("eval", "--url", live.url, "--api-key", KEY, "-e", "mixed", "--task", task_file(tmp_path), ok=False)
    assert r.exit_code == 2 and "--task through --url needs an ensemble scored token by token" in r.stderr
    r = run("eval", "--url", live.url, "-e", "pair", a, ok=False)
    assert r.exit_code == 2 and "refused the request" in r.stderr and "--api-key" in r.stderr
    r = run("eval", "--url", live.url, "--api-key", KEY, "-e", "nope", a, ok=False)
    assert r.exit_code == 2 and "nope" in r.stderr and r.stderr.count("\n") == 1
    r = run("eval", "--url", live.url, "--api-key", KEY, "-e", "pair", "--weights", "three=1", a, ok=False)
    assert r.exit_code == 2 and "ensemble 'pair' has no member 'three'" in r.stderr
    r = run("eval", "--url", "http://127.0.0.1:9", a, ok=False)
    assert r.exit_code == 2 and r.stderr.startswith("me-local: error: cannot reach http://127.0.0.1:9 (")
    assert "is `me-local serve` running there?" in r.stderr
