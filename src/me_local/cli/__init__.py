"""The command line: ``me-local`` and its commands.

:mod:`.main` holds the click group and the commands that need no server
(generate, chat, models); ``serve``, ``service``, ``bench``, ``eval`` and ``tune``
live in their own packages and are registered lazily (``LAZY_COMMANDS``). :mod:`.chat` is the
interactive chat (in-process or through a daemon), :mod:`.models` what
``me-local models`` prints, :mod:`.report` the figures both print.
"""

from .main import LAZY_COMMANDS, cli, main

__all__ = ["LAZY_COMMANDS", "cli", "main"]
