"""How model files are loaded: weight repacking (AMX), mmap and files changed under a
running model, and broken files (truncated, not GGUF, unknown architecture)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from me_local.backends.cpu import AMX_FLAGS, decide_repack, read_cpu_flags
from me_local.backends.gguf_check import GGML_TYPE_SIZES, read_gguf_header
from me_local.backends.llama import (
    BaselineCompletion,
    ContextSettings,
    LoadedModel,
    LoadSettings,
    ModelStore,
)
from me_local.cli.models import describe
from me_local.config import parse_config
from me_local.core import SamplingParams
from me_local.engine import Engine, Request, collect
from me_local.errors import ModelLoadError

from .conftest import _load_script

gguf = pytest.importorskip("gguf")

AVX512 = frozenset({"fpu", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"})
SAPPHIRE_RAPIDS = AVX512 | {"amx_bf16", "avx512_fp16", "amx_tile", "amx_int8"}
GREEDY = dict(max_tokens=8, temperature=0.0, seed=1)


# --------------------------------------------------------------------------- repacking


@pytest.mark.parametrize(
    "setting,flags,repack,reason",
    [
        ("auto", SAPPHIRE_RAPIDS, False, "this CPU has AMX (llama.cpp#20824)"),
        ("auto", AVX512 | {"amx_tile"}, False, "this CPU has AMX"),  # any one of the three flags
        ("auto", AVX512, True, "this CPU has no AMX"),
        ("auto", frozenset(), True, "this CPU has no AMX"),  # no /proc/cpuinfo (macOS)
        ("off", AVX512, False, "set in models.yaml"),
        ("on", AVX512, True, "set in models.yaml"),
        ("on", SAPPHIRE_RAPIDS, True, "although this CPU has AMX (llama.cpp#20824"),
        ("off", SAPPHIRE_RAPIDS, False, "set in models.yaml"),
    ],
)
def test_the_repack_decision(setting, flags, repack, reason):
    chosen, why = decide_repack(setting, flags)
    assert chosen is repack
    assert reason in why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(textwrap.dedent("""\
        processor\t: 0
        model name\t: Intel(R) Xeon(R) Platinum 8488C
        flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8
        bugs\t\t: spectre_v1

        processor\t: 1
        flags\t\t: fpu
        """))
    flags = read_cpu_flags(cpuinfo)
    assert flags >= AMX_FLAGS and "avx2" in flags and "spectre_v1" not in flags
    assert decide_repack("auto", flags) == (False, "this CPU has AMX (llama.cpp#20824)")
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_load_settings_resolve_and_describe():
    amx = LoadSettings.resolve("auto", flags=SAPPHIRE_RAPIDS)
    assert (amx.repack, amx.mmap) == (False, False)
    assert amx.describe("smollm.gguf") == (
        "repack off for smollm.gguf: this CPU has AMX (llama.cpp#20824); weights read into memory (mmap: false)"
    )
    plain = LoadSettings.resolve("auto", flags=AVX512, mmap=True)
    assert plain.repack and plain.mmap
    assert plain.describe("m.gguf").startswith("repack on for m.gguf: this CPU has no AMX; weights mapped")
    # the reason is not part of the identity: "auto" and "on" resolving alike load once
    assert LoadSettings.resolve("on", flags=AVX512) == LoadSettings.resolve("auto", flags=AVX512)


def test_the_store_shares_a_model_only_between_equal_load_settings(tiny_models):
    store = ModelStore()
    a = store.acquire(tiny_models["a1"], LoadSettings(repack=True))
    b = store.acquire(tiny_models["a1"], LoadSettings(repack=True, repack_reason="another reason"))
    c = store.acquire(tiny_models["a1"], LoadSettings(repack=False))
    d = store.acquire(tiny_models["a1"], LoadSettings(repack=False, mmap=True))
    assert a is b and c is not a and d is not c and len(store) == 3
    for m in (a, b, c, d):
        store.release(m)
    assert len(store) == 0


def test_one_log_line_per_load_says_what_was_chosen_and_why(tiny_models, write_config, caplog):
    a1 = tiny_models["a1"]
    cfg = parse_config(textwrap.dedent(f"""
        ensembles:
          e:
            n_ctx: 64
            members:
              - {{name: x, path: {a1}, repack: off}}
              - {{name: y, path: {a1}, repack: off}}
              - {{name: z, path: {a1}, repack: on}}
        """), write_config("").parent / "models.yaml")
    with caplog.at_level(logging.INFO, logger="me_local.llama"):
        engine = Engine(cfg)
        engine.ensemble("e")
        engine.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("repack ")]
    assert lines == [
        "repack off for tiny-a-1.gguf: set in models.yaml; weights read into memory (mmap: false)",
        "repack on for tiny-a-1.gguf: set in models.yaml; weights read into memory (mmap: false)",
    ]


def test_me_local_models_shows_the_load_settings_per_member(tiny_models, write_config):
    a1 = tiny_models["a1"]
    cfg = parse_config(textwrap.dedent(f"""
        ensembles:
          e:
            members:
              - {{name: x, path: {a1}, repack: off}}
              - {{name: y, path: {a1}, repack: off}}
              - {{name: z, path: {a1}, repack: on, mmap: true}}
        """), write_config("").parent / "models.yaml")
    text, ok = describe(cfg)
    assert ok
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and "weight" in line}
    assert "mmap off  repack off (set in models.yaml)  shares weights with x" in lines["y"]
    assert "mmap on  repack on (set in models.yaml)" in lines["z"] and "shares" not in lines["z"]


@pytest.mark.parametrize("repack,mmap", [(False, False), (True, True)])
def test_the_llama_cpp_python_baseline_loads_like_the_members(tiny_models, repack, mmap):
    import llama_cpp.llama_cpp as L

    original = L.llama_model_default_params
    baseline = BaselineCompletion(tiny_models["a1"], ContextSettings(n_ctx=64, n_threads=1),
                                  LoadSettings(repack=repack, mmap=mmap))
    try:
        params = baseline._llm.model_params
        assert bool(params.use_extra_bufts) is repack
        assert params.load_mode == (L.LLAMA_LOAD_MODE_MMAP if mmap else L.LLAMA_LOAD_MODE_NONE)
        if not mmap:
            assert params.lazy_mode == L.LLAMA_LAZY_MODE_OFF
        assert L.llama_model_default_params is original  # put back after the load
        timing = baseline.run([1, 2, 3], 3, SamplingParams(temperature=0.0), seed=1)
        assert timing.generated_tokens == 3
    finally:
        baseline.close()


@pytest.mark.parametrize("mmap", [False, True])
def test_the_baseline_asks_for_huge_pages_between_the_load_and_the_context(tiny_models, monkeypatch, mmap):
    """As LoadedModel does: advised after the context too, the collapse failed (EINVAL) over
    the merged weights+context mapping and the baseline's weights got no huge pages."""
    import llama_cpp.llama_cpp as L

    import me_local.backends.hugepages as baseline_module

    steps: list[str] = []
    load, init = L.llama_model_load_from_file, L.llama_init_from_model
    monkeypatch.setattr(L, "llama_model_load_from_file", lambda *a: (steps.append("load"), load(*a))[1])
    monkeypatch.setattr(L, "llama_init_from_model", lambda *a: (steps.append("context"), init(*a))[1])
    monkeypatch.setattr(baseline_module, "advise_new_anonymous", lambda before: steps.append("advise") or 0)
    baseline = BaselineCompletion(tiny_models["a1"], ContextSettings(n_ctx=64, n_threads=1),
                                  LoadSettings(repack=False, mmap=mmap))
    baseline.close()
    assert steps == (["load", "context"] if mmap else ["load", "advise", "context"])


# --------------------------------------------------------------------------- the file under a running model


def _one_member_config(path: Path, tmp_path: Path, **settings: object) -> object:
    extra = "".join(f", {k}: {str(v).lower()}" for k, v in settings.items())
    text = f"ensembles:\n  e:\n    n_ctx: 64\n    members:\n      - {{name: m, path: {path}, n_threads: 1{extra}}}\n"
    return parse_config(text, tmp_path / "models.yaml")


def _greedy(engine: Engine) -> str:
    text, _done = collect(engine.generate(Request(ensemble="e", prompt="Hello world", params=SamplingParams(**GREEDY))))
    return text


def test_a_served_file_truncated_or_overwritten_in_place_does_not_matter_by_default(tiny_models, tmp_path):
    served = tmp_path / "served.gguf"
    shutil.copy(tiny_models["a1"], served)
    engine = Engine(_one_member_config(served, tmp_path))  # default: mmap false
    try:
        before = _greedy(engine)
        assert len(before) > 0
        os.truncate(served, 0)  # with the file mapped, the next decode would die of SIGBUS
        assert _greedy(engine) == before
        shutil.copyfile(tiny_models["a2"], served)  # `cp new served.gguf`: written in place
        assert _greedy(engine) == before  # still the weights read at load time
    finally:
        engine.close()
    reloaded = Engine(_one_member_config(served, tmp_path))  # what a SIGHUP reload does: read the new file
    try:
        assert _greedy(reloaded) != before
    finally:
        reloaded.close()


_SIGBUS_CHILD = """
import os, sys
from pathlib import Path
from me_local.config import parse_config
from me_local.core import SamplingParams
from me_local.engine import Engine, Request, collect
path, mmap = sys.argv[1], sys.argv[2]
member = f"{{name: m, path: {path}, repack: off, mmap: {mmap}}}"
text = f"ensembles:\\n  e:\\n    n_ctx: 64\\n    members:\\n      - {member}\\n"
engine = Engine(parse_config(text, Path(path).with_name("models.yaml")))
def run():
    return collect(engine.generate(Request(ensemble="e", prompt="Hello", params=SamplingParams(max_tokens=4))))[0]
run()
os.truncate(path, 0)
print("survived", repr(run()), flush=True)
"""


@pytest.mark.parametrize("mmap", ["false", "true"])
def test_with_mmap_true_a_truncated_file_kills_the_process(tiny_models, tmp_path, mmap):
    """Why mmap defaults to false (in a child process: the crash is a SIGBUS)."""
    served = tmp_path / "served.gguf"
    shutil.copy(tiny_models["a1"], served)
    proc = subprocess.run([sys.executable, "-c", _SIGBUS_CHILD, str(served), mmap],
                          capture_output=True, text=True, timeout=120)
    if mmap == "true":
        assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr[-2000:])
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "survived" in proc.stdout


# --------------------------------------------------------------------------- broken files


def _broken(kind: str, good: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.gguf"
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])  # cut inside the tensor data
    elif kind == "truncated_header":
        path.write_bytes(data[:3000])  # cut inside the tokenizer's key/value pairs
    elif kind == "last_byte":
        path.write_bytes(data[:-1])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>\n" * 20)
    elif kind == "nosucharch":  # a tiny model whose general.architecture llama.cpp does not know
        _load_script("make_tiny_models").build_tiny_model(path, 1, arch="nosucharch")
    else:
        raise AssertionError(kind)
    return path


BROKEN = {
    "truncated": ["is truncated: tensor", "re-download or re-copy the file"],
    "truncated_header": ["is truncated or damaged: its header runs past the end", "re-download or re-copy"],
    "last_byte": ["is truncated: tensor 'output.weight' ends at byte", "re-download or re-copy"],
    "empty": ["is empty (0 bytes)", "re-download or re-copy"],
    "garbage": ["is not a GGUF model file (it starts with b'<!DO'", "name a .gguf file"],
    "nosucharch": ["unknown model architecture: 'nosucharch'", "llama-cpp-python",
                   "may be too old for its architecture 'nosucharch'", "upgrade it"],
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_model_file_is_a_one_line_error_with_exit_2(kind, tiny_models, tmp_path):
    path = _broken(kind, tiny_models["a1"], tmp_path)
    cfg = tmp_path / "models.yaml"
    cfg.write_text(f"ensembles:\n  e:\n    n_ctx: 64\n    members:\n      - {{name: m, path: {path}}}\n")
    proc = subprocess.run([sys.executable, "-m", "me_local.cli", "generate", "--config", str(cfg), "-n", "2", "Hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("me-local: error: ") and str(path) in err
    for needle in BROKEN[kind]:
        assert needle in err, (needle, err)


def test_the_header_reader_accepts_good_files_and_knows_the_quant_sizes(tiny_models, smollm_path):
    header = read_gguf_header(tiny_models["a1"])
    reader = gguf.GGUFReader(tiny_models["a1"])
    assert (header.version, header.architecture, header.n_tensors) == (3, "llama", len(reader.tensors))
    assert header.data_offset == reader.data_offset and header.data_end == header.file_size
    big = read_gguf_header(smollm_path)  # a real, quantized model: its last tensor ends at the file's end
    assert big.architecture == "llama" and big.data_end == big.file_size
    for ttype, sizes in GGML_TYPE_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)] == sizes


def test_header_damage_is_reported_without_reading_past_the_file(tiny_models, tmp_path):
    data = bytearray(tiny_models["a1"].read_bytes())
    huge = tmp_path / "huge_counts.gguf"
    huge.write_bytes(bytes(data[:8]) + (2**62).to_bytes(8, "little") * 2 + bytes(data[24:]))
    with pytest.raises(ModelLoadError, match="truncated or damaged"):
        read_gguf_header(huge)
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(data[8:]))
    with pytest.raises(ModelLoadError, match="GGUF version 1"):
        read_gguf_header(v1)
    zero = tmp_path / "zero.gguf"
    zero.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"damaged header \(GGUF version 0\)"):
        read_gguf_header(zero)


def test_a_broken_file_at_load_is_a_model_load_error_in_process(tiny_models, tmp_path):
    for kind in ("truncated", "garbage", "nosucharch"):
        path = _broken(kind, tiny_models["a1"], tmp_path)
        with pytest.raises(ModelLoadError, match=str(path)):
            LoadedModel(path)
