"""The machine a service is installed on, as one replaceable object.

A :class:`Host` is everything install, uninstall and status learn from the
machine (platform, home, environment, uid, a root prefix for system paths, the
``me-local`` command line) and the one way they act on it (a :data:`Runner` that
runs a command and returns a :class:`CommandResult`). :meth:`Host.current` is
this machine; tests build one whose home and root are temporary directories and
whose runner records commands instead of running them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ServiceError

Scope = Literal["user", "system"]
Manager = Literal["systemd", "launchd"]


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str]], CommandResult]


def subprocess_runner(argv: Sequence[str]) -> CommandResult:
    """Run a command, capturing its output (the default :data:`Runner`)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as exc:
        return CommandResult(127, "", f"{argv[0]}: {exc.strerror or exc}")
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


def find_me_local(python: str = sys.executable, which: Callable[[str], str | None] = shutil.which) -> tuple[str, ...]:
    """This environment's ``me-local`` as an absolute command line.

    The script next to the running interpreter first: the interpreter path is not
    resolved, since a virtual environment's ``python`` is a symlink out of it.
    Then ``me-local`` on PATH, then ``python -m me_local.cli``.
    """
    candidate = Path(python).parent / "me-local"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return (str(candidate.absolute()),)
    found = which("me-local")
    if found:
        return (str(Path(found).absolute()),)
    return (str(Path(python).absolute()), "-m", "me_local.cli")


@dataclass
class Host:
    """What install, uninstall and status learn from the machine, and how they act on it."""

    platform: str
    home: Path
    environ: Mapping[str, str]
    uid: int
    runner: Runner = subprocess_runner
    root: Path = Path("/")
    """Prefix of system-wide paths (/etc, /Library, /run, /proc, /var); tests point it at a temporary directory."""
    which: Callable[[str], str | None] = shutil.which
    executable: tuple[str, ...] | None = None
    """The me-local command line the service runs; None finds this environment's."""

    @classmethod
    def current(cls) -> Host:
        return cls(platform=sys.platform, home=Path.home(), environ=dict(os.environ), uid=os.geteuid())

    @property
    def manager(self) -> Manager:
        if self.platform.startswith("linux"):
            return "systemd"
        if self.platform == "darwin":
            return "launchd"
        raise ServiceError(
            f"`me-local service` supports Linux (systemd) and macOS (launchd), not {self.platform!r}; "
            "run `me-local serve` under this system's own service manager"
        )

    def path(self, system_path: str) -> Path:
        return self.root / system_path.lstrip("/")

    def command(self) -> tuple[str, ...]:
        return self.executable if self.executable is not None else find_me_local(which=self.which)

    def config_home(self) -> Path:
        xdg = self.environ.get("XDG_CONFIG_HOME", "")
        return Path(xdg) if xdg and os.path.isabs(xdg) else self.home / ".config"

    def user_name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return self.environ.get("USER") or str(self.uid)


def userns_available(host: Host) -> bool:
    """Whether a user service can sandbox itself (systemd needs unprivileged user namespaces for that)."""

    def read(path: str) -> str | None:
        try:
            return host.path(path).read_text().strip()
        except OSError:
            return None

    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":  # Ubuntu 23.10 and later
        return False
    if read("/proc/sys/kernel/unprivileged_userns_clone") == "0":  # Debian's older switch
        return False
    return read("/proc/sys/user/max_user_namespaces") != "0"


def user_manager_reachable(host: Host) -> bool:
    """Whether ``systemctl --user`` can reach this user's systemd instance.

    It connects to the manager's socket ``$XDG_RUNTIME_DIR/systemd/private`` (falling back
    to the user bus, ``$XDG_RUNTIME_DIR/bus``). A login session provides both and only its
    owner may use them; under ``sudo`` or ``su`` the variable is unset or names another
    user's directory.
    """
    runtime = host.environ.get("XDG_RUNTIME_DIR", "")
    if not os.path.isabs(runtime):
        return False
    return any(os.access(Path(runtime, *name), os.R_OK | os.W_OK) for name in (("systemd", "private"), ("bus",)))
