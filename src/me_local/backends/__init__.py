"""Backends implement the core's Member protocol. The only one is the
llama.cpp adapter in :mod:`me_local.backends.llama`, the one module of
me-local that imports llama_cpp."""
