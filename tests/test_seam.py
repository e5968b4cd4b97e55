"""The backend seam: members the factory returns own their hold on the model; the
backend's failures are told apart by what failed, not by guessing; errors that are not
configuration have their own classes, with the same exit status and message."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from me_local.backends.llama import BaselineCompletion, ContextSettings, LlamaMember, LoadedModel, ModelStore
from me_local.cli import cli
from me_local.config import load_config
from me_local.core import SamplingParams
from me_local.engine import llama_member_factory
from me_local.errors import BackendError, ConfigError, ModelLoadError, SettingError

from .conftest import _load_script


def test_a_member_from_the_factory_releases_its_model_once_when_closed(tiny_config: Path) -> None:
    store = ModelStore()
    factory = llama_member_factory(store)
    assert factory.store is store
    ens = load_config(tiny_config).get("pair")
    one, again = factory(ens.members[0], ens), factory(ens.members[0], ens)
    assert one.model is again.model and len(store) == 1 and one.model.refs == 2
    one.close()
    one.close()  # closing twice gives the model back once
    assert len(store) == 1 and again.model.refs == 1
    again.evaluate([1, 2, 3])  # the model is still there for the other member
    again.close()
    assert len(store) == 0


def test_a_setting_that_does_not_suit_the_model_names_where_it_is_set(write_config, tiny_models) -> None:
    cfg = write_config(f"""
        ensembles:
          q8:
            n_ctx: 64
            kv_cache_type: q8_0
            members: [{{name: a, path: {tiny_models['a1']}}}]
        """)
    store = ModelStore()
    ens = load_config(cfg).get("q8")
    with pytest.raises(SettingError) as info:
        llama_member_factory(store)(ens.members[0], ens)
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2
    assert (info.value.file, info.value.key, info.value.setting) == (str(cfg), "ensembles.q8.kv_cache_type",
                                                                     "kv_cache_type")
    reason = ("kv_cache_type q8_0 needs an attention head size that is a multiple of 32, and tiny-a-1.gguf "
              "has 16; set kv_cache_type: f16 for this ensemble")
    assert str(info.value) == f"{cfg}: ensembles.q8.kv_cache_type: {reason}"
    assert len(store) == 0  # the model loaded for it was given back
    model = LoadedModel(tiny_models["a1"])
    try:
        with pytest.raises(SettingError) as direct:  # without a factory, nobody knows the file
            LlamaMember("a", model, ContextSettings(n_ctx=64, kv_cache_type="q8_0"))
        assert str(direct.value) == reason and direct.value.file is None
    finally:
        model.close()


def test_a_closed_member_says_so(tiny_models) -> None:
    model = LoadedModel(tiny_models["a1"])
    member = LlamaMember("a", model, ContextSettings(n_ctx=64, n_threads=1))
    member.evaluate([1, 2])
    member.close()
    try:
        for call in (lambda: member.make_sampler(SamplingParams(), 1), member.logits, lambda: member.evaluate([3])):
            with pytest.raises(BackendError, match="member 'a' is closed"):
                call()
    finally:
        model.close()


def test_the_baseline_tells_a_refused_file_from_a_context_it_could_not_create(tiny_models, tmp_path) -> None:
    arch = tmp_path / "nosucharch.gguf"
    _load_script("make_tiny_models").build_tiny_model(arch, 1, arch="nosucharch")
    with pytest.raises(ModelLoadError, match=r"llama.cpp could not load .*nosucharch.gguf.*architecture 'nosucharch'"):
        BaselineCompletion(arch, ContextSettings(n_ctx=64, n_threads=1))
    # a context llama.cpp refuses cheaply: a q8_0 cache cannot pack the tiny model's head size of 16
    with pytest.raises(ModelLoadError) as info:
        BaselineCompletion(tiny_models["a1"], ContextSettings(n_ctx=64, n_threads=1, kv_cache_type="q8_0"))
    assert str(info.value) == (
        "llama.cpp could not create a context of 64 tokens for the baseline on tiny-a-1.gguf (K cache type "
        "q8_0 with block size 32 does not divide n_embd_head_k=16); lower n_ctx in models.yaml or free some memory")


def test_a_usage_error_exits_2_with_its_message(tiny_config: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--config", str(tiny_config), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert result.output == ("me-local: error: refusing to listen on '0.0.0.0' (reachable from other machines) "
                             "without an API key; set --api-key or ME_LOCAL_API_KEY, or pass --insecure to allow "
                             "it anyway\n")
