"""The llama-cpp-python adapter: the one package of me-local that imports llama_cpp.

    _lib.py           the llama_cpp import, its log routed to Python logging, error capture,
                      backend initialisation, version
    model.py          LoadSettings, LoadedModel (one file loaded once: vocabulary, tokenizing,
                      chat prompts), inspect_model
    chat_template.py  rendering a file's chat template; splitting it at message contents
    context.py        LlamaMember (one member in one slot: a llama context), NativeSampler,
                      ContextSettings
    embedding.py      LlamaEmbedder (a member's embedding context, apart from the slots), EmbedSettings
    grammar.py        LlamaGrammar (a request's grammar over one vocabulary, checked before every
                      accept), PrefixIndex (masks from the tokens' first bytes)
    store.py          ModelStore: each file loaded once and shared; the CPU shared between slots
    threads.py        CpuShare and the thread counts (no llama_cpp)
    baseline.py       the bench's reference: llama-cpp-python's own completion loop, timed

:class:`LoadedModel` and :class:`LlamaMember` implement the seam in
:mod:`me_local.backends.types`. Importing this sets no environment variable: the entry
points call :func:`me_local.runtime.prepare` before it is first imported.
"""

from ...runtime import GOMP_SPINCOUNT, cuda_graphs_wanted
from ._lib import llama_cpp_version, supports_gpu_offload
from .baseline import BaselineCompletion, CompletionTiming, baseline_completion_speed
from .chat_template import DEFAULT_CHAT_TEMPLATE
from .context import ContextSettings, LlamaMember, NativeSampler
from .embedding import EmbedSettings, LlamaEmbedder
from .model import LoadedModel, LoadSettings, inspect_model
from .store import ModelStore
from .threads import CpuShare, available_cpus, default_threads

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "GOMP_SPINCOUNT",
    "BaselineCompletion",
    "CompletionTiming",
    "ContextSettings",
    "CpuShare",
    "EmbedSettings",
    "LlamaEmbedder",
    "LlamaMember",
    "LoadSettings",
    "LoadedModel",
    "ModelStore",
    "NativeSampler",
    "available_cpus",
    "baseline_completion_speed",
    "cuda_graphs_wanted",
    "default_threads",
    "inspect_model",
    "llama_cpp_version",
    "supports_gpu_offload",
]
