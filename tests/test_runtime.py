"""The process set-up before llama.cpp loads (me_local.runtime.prepare): an explicit call
made by the entry points, never a side effect of importing me-local."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from me_local.runtime import GOMP_SPINCOUNT, prepare

PREPARED = ("GOMP_SPINCOUNT", "GGML_CUDA_DISABLE_GRAPHS", "ME_LOCAL_CUDA_GRAPHS")

# Records the environment at the moment llama_cpp is first imported (when libgomp and ggml load).
WATCH = textwrap.dedent(
    """
    import os, sys
    seen = []
    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "llama_cpp" and not seen:
                seen.append((os.environ.get("GOMP_SPINCOUNT"), os.environ.get("GGML_CUDA_DISABLE_GRAPHS")))
    sys.meta_path.insert(0, Watch())
    """
)


def _python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in PREPARED}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_importing_me_local_sets_no_environment_variable() -> None:
    code = ("import os, me_local.backends.llama, me_local.engine, me_local.server;"
            "print([os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'GGML_CUDA_DISABLE_GRAPHS')])")
    assert _python(code) == "[None, None]"


def test_the_cli_prepares_the_environment_before_llama_cpp_loads(tiny_config: Path) -> None:
    code = WATCH + textwrap.dedent(
        """
        from me_local.cli import main
        sys.argv = ["me-local", "models", "--config", sys.argv[1]]
        try:
            main()
        except SystemExit:
            pass
        print(seen)
        """
    )
    assert _python(code, str(tiny_config)) == "[('300', '1')]"


def test_the_engines_default_factory_prepares_the_environment_for_library_users(tiny_config: Path) -> None:
    code = WATCH + textwrap.dedent(
        """
        from me_local.config import load_config
        from me_local.engine import Engine
        engine = Engine(load_config(sys.argv[1]))
        engine.ensemble("short")
        engine.close()
        print(seen)
        """
    )
    assert _python(code, str(tiny_config)) == "[('300', '1')]"


def test_prepare_sets_only_what_the_user_has_not() -> None:
    env = {"GOMP_SPINCOUNT": "5000"}
    prepare(env)
    assert env == {"GOMP_SPINCOUNT": "5000", "GGML_CUDA_DISABLE_GRAPHS": "1"}
    env = {"ME_LOCAL_CUDA_GRAPHS": "1"}
    prepare(env)
    assert env == {"ME_LOCAL_CUDA_GRAPHS": "1", "GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    again = dict(env)
    prepare(again)
    assert again == env


def test_prepare_after_llama_cpp_loaded_says_it_may_not_take_effect(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("llama_cpp")
    with caplog.at_level(logging.DEBUG, logger="me_local.runtime"):
        prepare({"GOMP_SPINCOUNT": "300", "GGML_CUDA_DISABLE_GRAPHS": "1"})  # nothing to change: nothing to say
        assert caplog.records == []
        prepare({})
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert caplog.records[0].getMessage() == (
        "llama_cpp was imported before me_local.runtime.prepare(): "
        "GOMP_SPINCOUNT=300, GGML_CUDA_DISABLE_GRAPHS=1 may not take effect"
    )
