"""The process set-up me-local needs before llama.cpp loads: one explicit call.

:func:`prepare` sets the environment variables that libgomp and ggml read once,
when the llama_cpp library loads. Importing me-local sets nothing; the entry
points call it first thing: ``me-local``'s ``main()``, the engine's default
member factory (for library users who build an :class:`~me_local.engine.Engine`
without one), the bench's probe process and the scripts. A library user who
imports :mod:`me_local.backends.llama` or ``llama_cpp`` directly calls it
before that import. A setting the user made in the environment wins.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("me_local.runtime")

#: How many times a llama.cpp CPU thread spins at a barrier before it sleeps (GNU OpenMP;
#: libgomp's default is 300,000). Why 300, measured: docs/performance.md ("OpenMP spinning").
GOMP_SPINCOUNT = "300"


def cuda_graphs_wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether to leave llama.cpp's CUDA graphs on (ME_LOCAL_CUDA_GRAPHS=1).

    ``me`` decodes catch-up batches whose size changes every step, and llama.cpp
    re-captures a CUDA graph whenever that happens, so me-local turns them off
    (GGML_CUDA_DISABLE_GRAPHS; any value disables, so the opt-out is ours). CPU
    builds ignore it. Measured on an H100: docs/gpu.md ("CUDA graphs").
    """
    return env.get("ME_LOCAL_CUDA_GRAPHS") == "1"


def prepare(environ: MutableMapping[str, str] | None = None) -> None:
    """Set what llama.cpp reads when it loads, unless the user has set it already:

    - ``GOMP_SPINCOUNT=300``: a short OpenMP spin, so that a llama.cpp thread whose
      partner was descheduled sleeps instead of burning its core;
    - ``GGML_CUDA_DISABLE_GRAPHS=1`` unless ``ME_LOCAL_CUDA_GRAPHS=1``.

    Environment only (``environ``, default ``os.environ``): no import, no I/O. Call it
    before anything imports llama_cpp; once that library is loaded, a change may not take
    effect (logged at debug). Calling it again changes nothing.
    """
    env = os.environ if environ is None else environ
    wanted = {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    if not cuda_graphs_wanted(env):
        wanted["GGML_CUDA_DISABLE_GRAPHS"] = "1"
    new = [name for name in wanted if name not in env]
    for name in new:
        env[name] = wanted[name]
    if new and "llama_cpp" in sys.modules:
        log.debug("llama_cpp was imported before me_local.runtime.prepare(): %s may not take effect",
                  ", ".join(f"{name}={wanted[name]}" for name in new))
