"""The files a service install writes: the systemd unit, the launchd property list, the environment file.

A :class:`ServiceSpec` says everything a unit or plist says; :func:`render` turns
it into bytes from the templates in ``templates/`` (package data, so an
installed wheel renders what a checkout does; ``service/`` at the top of the
repository points there). Templates use ``@NAME@`` placeholders and
``@if:flag@`` line conditions (:func:`render_text`); values that go into a
unit file are quoted by :func:`systemd_word`. The environment file (systemd's
``EnvironmentFile=``) is written by :func:`format_env_file`, read back by
:func:`parse_env_file`, and shown with secrets redacted by :func:`redact_env`.
"""

from __future__ import annotations

import plistlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .layout import LAUNCHD_LABEL, Layout

#: Time systemd allows from start to READY=1: loading several big models from a slow disk takes minutes.
START_TIMEOUT = "15min"
#: The daemon pings every half of this from its event loop; a loop stuck this long gets restarted.
WATCHDOG_SEC = "60s"
#: A variable name in an environment file or ``--env NAME=VALUE``.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_CONDITION = re.compile(r"@if:([a-z_]+)@")


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a rendered unit or plist says."""

    layout: Layout
    argv: tuple[str, ...]
    config: Path
    run_as: str | None = None
    """The account a system service runs as (None: a user service)."""
    gpu_groups: tuple[str, ...] = ()
    sandbox: bool = True
    writable: tuple[Path, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    """launchd's EnvironmentVariables (systemd reads the environment file instead)."""


def template(name: str) -> str:
    return resources.files("me_local.service").joinpath("templates").joinpath(name).read_text(encoding="utf-8")


def no_newline(text: str, what: str) -> str:
    """``text``, refused when it contains a line break or NUL (it would end a line of the file early)."""
    if any(c in text for c in "\n\r\0"):
        raise UsageError(f"{what} {text!r} contains a line break or NUL; use one without")
    return text


def systemd_word(text: str, *, exec_line: bool = False) -> str:
    """Quote one word for a unit file: ``%`` specifiers (and ``$`` in an Exec line's arguments) escaped,
    double-quoted where it has spaces, quotes, backslashes or ``;``."""
    s = no_newline(text, "value").replace("%", "%%")
    if exec_line:
        s = s.replace("$", "$$")
    if s and not re.search(r"[\s\"'\\;]", s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_text(text: str, values: Mapping[str, str], flags: Mapping[str, bool]) -> str:
    """Fill ``@NAME@`` placeholders; keep a line starting ``@if:flag@`` only where the flag holds."""
    out = []
    for line in text.splitlines(keepends=True):
        cond = _CONDITION.match(line)
        if cond:
            if cond.group(1) not in flags:
                raise KeyError(f"template condition @if:{cond.group(1)}@ has no flag")
            if not flags[cond.group(1)]:
                continue
            line = line[cond.end() :]

        def fill(m: re.Match[str]) -> str:
            if m.group(1) not in values:
                raise KeyError(f"template placeholder @{m.group(1)}@ has no value")
            return values[m.group(1)]

        out.append(_PLACEHOLDER.sub(fill, line))
    return "".join(out)


def render_systemd(spec: ServiceSpec) -> str:
    lay = spec.layout
    assert lay.env_file is not None
    system = lay.scope == "system"
    values = {
        "SCOPE": lay.scope,
        "SYSTEMCTL_FLAG": "" if system else "--user ",
        # systemd expands $VAR in the arguments but not in the program's path.
        "EXEC_START": " ".join(systemd_word(a, exec_line=i > 0) for i, a in enumerate(spec.argv)),
        "ENV_FILE": no_newline(str(lay.env_file), "path").replace("%", "%%"),
        "RUN_AS": spec.run_as or "",
        "GPU_GROUPS": " ".join(spec.gpu_groups),
        "START_TIMEOUT": START_TIMEOUT,
        "WATCHDOG_SEC": WATCHDOG_SEC,
        "WRITABLE": " ".join(systemd_word(str(p)) for p in spec.writable),
        "WANTED_BY": "multi-user.target" if system else "default.target",
    }
    flags = {
        "system": system,
        "gpu_groups": system and bool(spec.gpu_groups),
        "sandbox": spec.sandbox,
        "no_sandbox": not spec.sandbox,
        "writable": spec.sandbox and bool(spec.writable),
    }
    return render_text(template("me-local.service.in"), values, flags)


def _fill_plist(node: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(node, str):
        m = _PLACEHOLDER.fullmatch(node)
        return values[m.group(1)] if m else node
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            value = _fill_plist(item, values)
            if isinstance(item, str) and isinstance(value, list):
                out.extend(value)
            elif value is not None:
                out.append(value)
        return out
    if isinstance(node, dict):
        filled = {k: _fill_plist(v, values) for k, v in node.items()}
        return {k: v for k, v in filled.items() if v is not None and v != {}}
    return node


def render_launchd(spec: ServiceSpec) -> bytes:
    assert spec.layout.log_file is not None
    values = {
        "LABEL": LAUNCHD_LABEL,
        "PROGRAM_ARGUMENTS": list(spec.argv),
        "ENVIRONMENT": dict(spec.environment),
        "USER_NAME": spec.run_as,
        "LOG_FILE": str(spec.layout.log_file),
    }
    data = _fill_plist(plistlib.loads(template("me-local.plist.in").encode()), values)
    return plistlib.dumps(data, sort_keys=False)


def render(spec: ServiceSpec) -> bytes:
    if spec.layout.manager == "systemd":
        return render_systemd(spec).encode()
    return render_launchd(spec)


# --------------------------------------------------------------------------- environment files


def is_secret(name: str) -> bool:
    return any(word in name.upper() for word in _SECRET_WORDS)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: ("<redacted>" if is_secret(k) else v) for k, v in env.items()}


def _env_value(value: str) -> str:
    no_newline(value, "environment value")
    if "'" not in value:
        return f"'{value}'"
    return '"' + re.sub(r'([\\"`$])', r"\\\1", value) + '"'


def format_env_file(env: Mapping[str, str]) -> str:
    lines = [
        "# Environment of the me-local service (systemd EnvironmentFile=); keep it readable by its owner only.",
        "# ME_LOCAL_API_KEY='...' makes the daemon require `Authorization: Bearer ...` on every request.",
    ]
    lines += [f"{k}={_env_value(v)}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def parse_env_file(text: str) -> dict[str, str]:
    """Read back ``NAME=value`` lines (quoted the way :func:`format_env_file` writes them)."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not ENV_NAME.fullmatch(name):
            continue
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        env[name] = value
    return env
