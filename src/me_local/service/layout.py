"""Where a service's files go, for each service manager and scope.

:func:`layout` maps (systemd or launchd, user or system) on a :class:`Host` to a
:class:`Layout`: the unit or property list, systemd's environment file,
launchd's log file, and the command lines (``systemctl [--user]``, the launchd
domain, the ``journalctl`` line) that address that installation. User paths
follow the host's home and ``$XDG_CONFIG_HOME``; system paths go through
:meth:`Host.path`, so tests can put them under a temporary root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .host import Host, Manager, Scope

UNIT_NAME = "me-local.service"
LAUNCHD_LABEL = "me-local"
ENV_FILE_NAME = "service.env"


@dataclass(frozen=True)
class Layout:
    manager: Manager
    scope: Scope
    service_file: Path
    env_file: Path | None
    """systemd's EnvironmentFile (launchd keeps the environment in the plist)."""
    log_file: Path | None
    """launchd's log (systemd's goes to the journal)."""
    uid: int

    @property
    def systemctl(self) -> list[str]:
        return ["systemctl", "--user"] if self.scope == "user" else ["systemctl"]

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}" if self.scope == "user" else "system"

    @property
    def journalctl(self) -> str:
        return f"journalctl {'--user ' if self.scope == 'user' else ''}-u me-local"


def layout(host: Host, manager: Manager, scope: Scope) -> Layout:
    if manager == "systemd":
        if scope == "user":
            unit = host.config_home() / "systemd" / "user" / UNIT_NAME
            env = host.config_home() / "me-local" / ENV_FILE_NAME
        else:
            unit = host.path("/etc/systemd/system") / UNIT_NAME
            env = host.path("/etc/me-local") / ENV_FILE_NAME
        return Layout(manager, scope, unit, env, None, host.uid)
    if scope == "user":
        plist = host.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        log = host.home / "Library" / "Logs" / "me-local" / "me-local.log"
    else:
        plist = host.path("/Library/LaunchDaemons") / f"{LAUNCHD_LABEL}.plist"
        log = host.path("/Library/Logs/me-local") / "me-local.log"
    return Layout(manager, scope, plist, None, log, host.uid)
