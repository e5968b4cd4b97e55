"""The settings table (src/me_local/settings.py) against every place that takes a
setting: each refuses exactly what the table refuses, and the README's reference
is the table's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from me_local import settings as S
from me_local.cli import cli
from me_local.cli.chat import HELP, ChatSession
from me_local.config import parse_config
from me_local.errors import MeLocalError
from me_local.server import ServerSettings
from me_local.server.errors import ApiError
from me_local.server.ollama import options_overrides
from me_local.server.openai import sampling_overrides
from me_local.server.params import ensemble_extension, logprob_options, resolve_model
from me_local.settings import Setting

from .conftest import ROOT, _load_script

README = (ROOT / "README.md").read_text(encoding="utf-8")
MEMBERS = [{"name": "a", "path": "a.gguf"}, {"name": "b", "path": "b.gguf"}]
CONFIG = parse_config(json.dumps({"ensembles": {"e": {"members": MEMBERS}}}), Path("/nowhere/models.yaml"))
ENSEMBLE = resolve_model(CONFIG, "e")


def test_settings_imports_only_the_standard_library():
    """The core takes its defaults from settings.py, so it must stay as pure as the core."""
    code = ("import sys; before = set(sys.modules); import me_local.settings;"
            "new = {m.partition('.')[0] for m in set(sys.modules) - before};"
            "bad = sorted(new - set(sys.stdlib_module_names) - {'me_local'}); print(','.join(bad));"
            "sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"settings.py imported: {proc.stdout} {proc.stderr}"


# --------------------------------------------------------------------------- every place, every bound


def _config(s: Setting[Any], value: Any) -> None:
    ensemble: dict[str, Any] = {"members": [dict(m) for m in MEMBERS]}
    if s.group == "sampling":
        ensemble["sampling"] = {s.name: value}
    elif s.group == "ensemble":
        ensemble[s.name] = value
    else:
        ensemble["members"][0][s.name] = value
    parse_config(json.dumps({"ensembles": {"e": ensemble}}), Path("/nowhere/models.yaml"))


def _flag(command: click.Command, s: Setting[Any], value: Any) -> None:
    [param] = [p for p in command.params if s.flag in getattr(p, "opts", ())]
    with click.Context(command) as ctx:
        param.type.convert(str(value), param, ctx)


def _cli(s: Setting[Any], value: Any) -> None:
    if s is S.WEIGHT:  # --weights a=0.7,b=0.3
        from me_local.config import parse_weights

        parse_weights(f"a={value}")
        return
    if s.group == "server":
        from me_local.server.command import serve
        from me_local.service import service

        _flag(serve, s, value)
        if s is S.PORT:
            _flag(service.commands["install"], s, value)
        return
    _flag(cli.commands["generate"], s, value)
    _flag(cli.commands["chat"], s, value)


def _api(api: str) -> Callable[[Setting[Any], Any], None]:
    def check(s: Setting[Any], value: Any) -> None:
        field = getattr(s, api).rpartition(".")[2]
        if s is S.WEIGHT:
            ensemble_extension({"ensemble": {"weights": {"a": value}}}, ENSEMBLE)
        elif getattr(s, api).startswith("ensemble."):  # mode, granularity: the `ensemble` extension
            ensemble_extension({"ensemble": {field: value}}, ENSEMBLE)
        elif s is S.TOP_LOGPROBS:
            logprob_options({field: value, "logprobs": True})
        elif api == "openai":
            sampling_overrides({field: value})
        else:
            options_overrides({"options": {field: value}}, CONFIG.get("e"))

    return check


class _Members:
    def member_names(self) -> list[str]:
        return ["a", "b"]


def _chat_set(s: Setting[Any], value: Any) -> None:
    session = ChatSession(_Members(), {})
    assert s.chat is not None
    session.set(s.chat, f"a={value}" if s is S.WEIGHT else str(value))


SERVER_FIELDS = {"max_body_size": "max_body_bytes"}
"""ServerSettings' field where it is not named after the setting."""


def _server(s: Setting[Any], value: Any) -> None:
    ServerSettings(**{SERVER_FIELDS.get(s.name, s.name): value}).check()


PLACES: dict[str, tuple[Callable[[Setting[Any]], bool], Callable[[Setting[Any], Any], None]]] = {
    "models.yaml": (lambda s: s.yaml, _config),
    "flag": (lambda s: s.flag is not None, _cli),
    "OpenAI": (lambda s: s.openai is not None, _api("openai")),
    # Ollama spells these its own way: a negative seed is a random one, num_predict -1 is no limit
    "Ollama": (lambda s: s.ollama is not None and s not in (S.SEED, S.MAX_TOKENS), _api("ollama")),
    "/set": (lambda s: s.chat is not None, _chat_set),
    "ServerSettings": (lambda s: s.group == "server", _server),
}
REFUSED = (MeLocalError, ApiError, click.BadParameter)


def _probes(s: Setting[Any]) -> list[tuple[Any, bool]]:
    """Values at each bound (accepted) and just past it (refused)."""
    if s.choices:
        return [*((c, True) for c in s.choices), ("nope", False)]
    if s.type not in (int, float):
        return []
    step = 1 if s.type is int else 0.5
    out: list[tuple[Any, bool]] = []
    if s.lo is not None:
        out += [(s.lo, True), (s.lo - step, False)]
    if s.hi is not None:
        out += [(s.hi, True), (s.hi + step if s.hi < 1e6 else s.hi * 2, False)]
    return out


CASES = [(s.name, place, value, ok) for s in S.SETTINGS for value, ok in _probes(s)
         for place, (takes, _) in PLACES.items() if takes(s)]


@pytest.mark.parametrize(("name", "place", "value", "ok"), CASES)
def test_every_place_refuses_what_the_table_refuses(name, place, value, ok):
    setting = next(s for s in S.SETTINGS if s.name == name)
    check = PLACES[place][1]
    if ok:
        check(setting, value)
    else:
        with pytest.raises(REFUSED):
            check(setting, value)


def test_every_setting_with_a_bound_is_probed_somewhere():
    probed = {name for name, *_ in CASES}
    bounded = {s.name for s in S.SETTINGS if s.choices or (s.type in (int, float) and (s.lo, s.hi) != (None, None))}
    assert bounded <= probed
    assert {"temperature", "top_k", "seed", "weight", "port", "mode", "n_ctx", "max_body_size", "header_timeout",
            "body_timeout", "write_timeout"} <= probed


def test_defaults_reach_the_dataclasses():
    from me_local.config import EnsembleConfig, MemberConfig, SamplingDefaults
    from me_local.core import SamplingParams

    ens, member, sampling, params = CONFIG.get("e"), CONFIG.get("e").members[0], SamplingDefaults(), SamplingParams()
    for s in S.SETTINGS:
        for obj, cls in ((ens, EnsembleConfig), (member, MemberConfig), (sampling, SamplingDefaults),
                         (params, SamplingParams)):
            if s.name in cls.__dataclass_fields__:
                assert getattr(obj, s.name) == s.default, (cls.__name__, s.name)
    server = ServerSettings()
    for s in S.SETTINGS:
        if s.group == "server":
            assert getattr(server, SERVER_FIELDS.get(s.name, s.name)) == s.default, s.name


def test_serve_flags_default_to_the_table():
    from me_local.server.command import serve

    for s in S.SETTINGS:
        if s.group == "server":
            [param] = [p for p in serve.params if s.flag in getattr(p, "opts", ())]
            assert param.default == s.default, s.name


# --------------------------------------------------------------------------- the docs


def test_readme_reference_is_rendered_from_the_table():
    script = _load_script("settings_reference")
    assert script.current(README) == script.render(), (
        "README.md's settings reference is out of date: run `python scripts/settings_reference.py --write`")


def _yaml_block() -> str:
    section = README[README.index("## models.yaml reference"):]
    return section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml"))]


def test_readme_models_yaml_block_has_every_key_with_the_tables_defaults_and_bounds():
    block = _yaml_block()
    data = yaml.safe_load(block)["ensembles"]["default"]
    assert set(data) == S.yaml_keys("ensemble") | {"members", "sampling"}
    assert set(data["sampling"]) == S.yaml_keys("sampling")
    assert {k for m in data["members"] for k in m} == S.yaml_keys("member") | {"name", "path"}
    for s in S.SAMPLING_DEFAULTS:  # the block shows the sampling defaults as its values
        value = data["sampling"][s.name]
        if isinstance(value, (list, dict)):  # stop: a list; logit_bias: a mapping, held as sorted pairs
            value = tuple(value) if isinstance(value, list) else tuple(sorted(value.items()))
        assert value == s.default, s.name
    by_name = {s.name: s for s in S.SETTINGS if s.yaml}
    checked = set()
    for line in block.splitlines():
        m = re.match(r"\s*-?\s*(\w+):.*?#(.*)$", line)
        if not m or m.group(1) not in by_name:
            continue
        s, comment = by_name[m.group(1)], m.group(2)
        if (d := re.search(r"\(default:? ([^,)]+)", comment)) is not None:
            assert d.group(1).strip() == s.default_shown(), line
            checked.add(s.name)
        if (r := re.search(r"(-?[\d.e]+)\.\.([\d.e]+)", comment)) is not None:
            assert (float(r.group(1)), float(r.group(2))) == (s.lo, s.hi), line
            checked.add(s.name)
        if (lo := re.search(r">= (-?\d+)", comment)) is not None:
            assert int(lo.group(1)) == s.lo, line
        if (c := re.match(r"\s*(\w+(?: \| \w+)+)", comment)) is not None:
            assert tuple(c.group(1).split(" | ")) == s.choices, line
            checked.add(s.name)
    assert {"mode", "n_ctx", "kv_cache_type", "temperature", "weight", "repack", "mmap", "repeat_penalty",
            "frequency_penalty", "logit_bias"} <= checked


def test_docs_give_the_tables_api_bounds_and_set_names():
    server_md = (ROOT / "docs" / "server.md").read_text(encoding="utf-8")
    for s in (S.TEMPERATURE, S.TOP_P, S.TOP_K, S.MIN_P, *S.PENALTIES):
        assert f"`{s.name}` {S.show_number(s.lo)}..{S.show_number(s.hi)}" in server_md, s.name
    assert f"`seed` | {S.show_number(S.SEED.lo)} .. {S.show_number(S.SEED.hi)};" in server_md
    assert f"up to {S.STOP.hi} strings" in server_md
    assert f"0..{S.TOP_LOGPROBS.hi}" in server_md
    names = "|".join(S.CHAT_SETTINGS)
    assert f"`/set {names} VALUE`" in README
    assert f"/set {names} VALUE" in HELP


def test_stop_strings_are_bounded_on_the_command_line_as_in_the_apis():
    from click.testing import CliRunner

    many = [arg for _ in range(S.STOP.hi + 1) for arg in ("--stop", "x")]
    result = CliRunner().invoke(cli, ["generate", "--config", "/nowhere/models.yaml", *many, "hi"])
    assert result.exit_code == 2 and f"17 given; at most {S.STOP.hi} are allowed" in result.output
    with pytest.raises(ApiError, match=f"at most {S.STOP.hi} are allowed"):
        sampling_overrides({"stop": ["x"] * (S.STOP.hi + 1)})


def test_a_null_integer_in_models_yaml_means_the_default():
    text = json.dumps({"ensembles": {"e": {"n_ctx": None, "max_queue": None, "sampling": {"top_k": None,
                                           "max_tokens": None}, "members": [dict(MEMBERS[0], n_threads=None)]}}})
    ens = parse_config(text, Path("/nowhere/models.yaml")).get("e")
    assert (ens.n_ctx, ens.max_queue, ens.sampling.top_k, ens.sampling.max_tokens, ens.members[0].n_threads) == (
        S.N_CTX.default, S.MAX_QUEUE.default, S.TOP_K.default, S.MAX_TOKENS.default, S.N_THREADS.default)
