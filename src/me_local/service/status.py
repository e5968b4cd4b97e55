"""``me-local service status``: whether the service is installed and running, in a few lines.

:func:`service_status` finds the installed scope, asks the service manager
(``systemctl show`` with the properties it needs, or ``launchctl print``) and
condenses the answer into a :class:`Status`: installed, running, and the text
the command prints (state, pid, restarts, where the logs are).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from ..errors import ServiceError
from .host import Host, Scope
from .layout import LAUNCHD_LABEL, UNIT_NAME, layout
from .plan import Run, command_error, host_problems, installed_scope


@dataclass(frozen=True)
class Status:
    installed: bool
    running: bool
    text: str


def _key_values(text: str, sep: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found:
            out.setdefault(key.strip(), value.strip())
    return out


def service_status(host: Host, scope: Scope | None) -> Status:
    manager = host.manager
    found = installed_scope(host, manager, scope)
    if found is None or not layout(host, manager, found).service_file.exists():
        return Status(False, False, "me-local is not installed as a service; install it with "
                      "`me-local service install`")
    lay = layout(host, manager, found)
    problems = host_problems(host, manager, found, "status")
    if problems:
        raise ServiceError(problems[0])
    head = f"me-local ({found} service): {lay.service_file}"
    if manager == "systemd":
        argv = [*lay.systemctl, "show", UNIT_NAME,
                "--property=LoadState,ActiveState,SubState,UnitFileState,MainPID,StatusText,NRestarts"]
        result = host.runner(argv)
        if result.returncode != 0:
            raise command_error(Run(tuple(argv)), result, host)
        props = _key_values(result.stdout, "=")
        active = props.get("ActiveState", "unknown")
        state = f"{active} ({props.get('SubState', '?')}), {props.get('UnitFileState') or 'not enabled'}"
        if props.get("MainPID", "0") not in ("", "0"):
            state += f", pid {props['MainPID']}"
        if props.get("NRestarts", "0") not in ("", "0"):
            state += f", restarted {props['NRestarts']} times"
        lines = [head, f"  state:  {state}"]
        if props.get("StatusText"):
            lines.append(f"  status: {props['StatusText']}")
        lines.append(f"  logs:   {lay.journalctl} -f")
        return Status(lay.service_file.exists(), active == "active", "\n".join(lines))
    target = f"{lay.domain}/{LAUNCHD_LABEL}"
    result = host.runner(["launchctl", "print", target])
    if result.returncode != 0:
        text = f"{head}\n  state:  not loaded (load it with `launchctl bootstrap {lay.domain} {lay.service_file}`)"
        return Status(True, False, text)
    props = _key_values(result.stdout, " = ")
    state = props.get("state", "unknown")
    desc = state + (f", pid {props['pid']}" if "pid" in props else "")
    if "last exit code" in props:
        desc += f", last exit code {props['last exit code']}"
    text = f"{head}\n  state:  {desc}\n  logs:   tail -f {shlex.quote(str(lay.log_file))}"
    return Status(True, state == "running", text)


