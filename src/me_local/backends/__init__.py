"""Backends: what runs the models. The seam the engine talks to is typed in
:mod:`me_local.backends.types` (a model handle, a member context, a member factory);
the one implementation is the llama.cpp adapter, :mod:`me_local.backends.llama`, the
only package of me-local that imports llama_cpp. ``cpu.py`` and ``gguf_check.py`` are
pure (no llama_cpp): the CPU flags and repack decision, and the GGUF header check."""
