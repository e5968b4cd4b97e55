"""``me-local serve``: an aiohttp daemon speaking the OpenAI and Ollama APIs.

The public surface: :class:`Server` and :class:`ServerSettings` (run, reload,
stop, readiness callbacks), :func:`config_loader`, :func:`create_app` and
:class:`ServerState` (for embedding and tests). The rest is private modules:
``wire`` (exact frames), ``openai``, ``ollama`` and ``embeddings`` (routes), ``security``,
``metrics``, ``bridge`` (worker thread -> event loop).
"""

from .app import create_app
from .runner import DEFAULT_PORT, Server, ServerSettings, config_loader
from .state import STATE, Loader, ServerState

__all__ = ["DEFAULT_PORT", "STATE", "Loader", "Server", "ServerSettings", "ServerState", "config_loader",
           "create_app"]
