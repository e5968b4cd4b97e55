"""``me-local service``: run ``me-local serve`` in the background under systemd or launchd.

Every command is planned first and carried out second, against a replaceable
machine. The modules, in the order they build on each other: :mod:`.host` (the
machine: platform, home, environment, uid, a command runner, a root prefix for
system paths), :mod:`.layout` (where the files go), :mod:`.render` (the unit,
the property list and the environment file, from ``templates/``), :mod:`.plan`
(install and uninstall as lists of steps; ``--dry-run`` prints them,
:func:`~.plan.execute` performs them), :mod:`.status` and :mod:`.command` (the
click group). :mod:`.sdnotify` is the other side of the unit: the daemon's half
of systemd's notification protocol, imported by ``me-local serve``. The names
below are imported on first use, so that ``serve`` importing
:mod:`.sdnotify` pulls in none of the installer (nor ``pwd`` and ``grp``, which
some platforms lack).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .command import service
    from .host import CommandResult, Host, find_me_local
    from .render import format_env_file, parse_env_file, systemd_word, template

_EXPORTS = {
    "service": "command",
    "CommandResult": "host",
    "Host": "host",
    "find_me_local": "host",
    "format_env_file": "render",
    "parse_env_file": "render",
    "systemd_word": "render",
    "template": "render",
}

__all__ = [
    "CommandResult",
    "Host",
    "find_me_local",
    "format_env_file",
    "parse_env_file",
    "service",
    "systemd_word",
    "template",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
