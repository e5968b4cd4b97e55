"""``me-local service``: run ``me-local serve`` in the background under systemd or launchd.

Templates live in ``me_local/service_templates/`` (``service/`` at the top of the
repository points there): a systemd unit (one template for the user and system
variants) and a launchd property list. They are package data, so an installed
wheel renders the same files a checkout does.

Every command is planned first and carried out second: a :class:`Plan` is a list
of steps (make a directory, write a file with a mode, remove a file, run a
command). ``--dry-run`` prints the plan; otherwise :func:`execute` performs it.
What the plan learns from the machine and the commands it runs go through a
:class:`Host` (platform, home, environment, uid, a command runner, a root prefix
for system paths), which tests replace with their own; the CLI takes it from
``ctx.obj`` when one is given.
"""

from __future__ import annotations

import grp
import os
import plistlib
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

import click

from .cli.options import setting_option
from .config import find_config, load_config
from .errors import ConfigError, MeLocalError
from .logs import LEVELS
from .settings import PORT

Scope = Literal["user", "system"]
Manager = Literal["systemd", "launchd"]

UNIT_NAME = "me-local.service"
LAUNCHD_LABEL = "me-local"
ENV_FILE_NAME = "service.env"
#: Time systemd allows from start to READY=1: loading several big models from a slow disk takes minutes.
START_TIMEOUT = "15min"
#: The daemon pings every half of this from its event loop; a loop stuck this long gets restarted.
WATCHDOG_SEC = "60s"
#: Groups that own GPU device nodes (/dev/dri/renderD*, /dev/kfd, some /dev/nvidia*) on common distributions.
GPU_GROUPS = ("video", "render")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_CONDITION = re.compile(r"@if:([a-z_]+)@")


# --------------------------------------------------------------------------- the machine


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
        raise ConfigError(
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


# --------------------------------------------------------------------------- where things go


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


# --------------------------------------------------------------------------- rendering


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
    return resources.files("me_local").joinpath("service_templates").joinpath(name).read_text(encoding="utf-8")


def _no_newline(text: str, what: str) -> str:
    if any(c in text for c in "\n\r\0"):
        raise ConfigError(f"{what} {text!r} contains a line break or NUL; use one without")
    return text


def systemd_word(text: str, *, exec_line: bool = False) -> str:
    """Quote one word for a unit file: ``%`` specifiers (and ``$`` in an Exec line's arguments) escaped,
    double-quoted where it has spaces, quotes, backslashes or ``;``."""
    s = _no_newline(text, "value").replace("%", "%%")
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
        "ENV_FILE": _no_newline(str(lay.env_file), "path").replace("%", "%%"),
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
    _no_newline(value, "environment value")
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
        if not sep or not _ENV_NAME.fullmatch(name):
            continue
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        env[name] = value
    return env


def parse_env_option(values: Iterable[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--env")
        env[name] = value
    return env


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class MakeDir:
    path: Path
    mode: int


@dataclass(frozen=True)
class WriteFile:
    path: Path
    content: bytes
    mode: int
    shown: str | None = None
    """What --dry-run prints instead of the content (secrets redacted); None: the content."""


@dataclass(frozen=True)
class RemoveFile:
    path: Path


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    check: bool = True
    note: str = ""
    """Said before running it (e.g. that it waits for the models to load)."""
    hint: str = ""
    """Added to the error when it fails."""


Step = MakeDir | WriteFile | RemoveFile | Run


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Printed after the steps (where the logs are, what to do next)."""
    problems: list[str] = field(default_factory=list)
    """Why it would fail here (only a dry run gets this far with any)."""

    @property
    def commands(self) -> list[list[str]]:
        return [list(s.argv) for s in self.steps if isinstance(s, Run)]

    def mkdir(self, path: Path, mode: int) -> None:
        if not path.is_dir():
            self.steps.append(MakeDir(path, mode))

    def run(self, *argv: str, check: bool = True, note: str = "", hint: str = "") -> None:
        self.steps.append(Run(tuple(argv), check, note, hint))


@dataclass(frozen=True)
class InstallOptions:
    scope: Scope = "user"
    config: str | None = None
    listen_host: str | None = None
    port: int | None = None
    log_level: str = "info"
    run_as: str | None = None
    sandbox: bool | None = None
    writable: tuple[str, ...] = ()
    serve_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    """New environment values; merged over the ones an earlier install wrote."""
    wait: bool = True


def host_problems(host: Host, manager: Manager, scope: Scope, action: str) -> list[str]:
    """What would make the service manager's commands fail here, each with its fix."""
    problems = []
    tool = "systemctl" if manager == "systemd" else "launchctl"
    if host.which(tool) is None:
        problems.append(
            f"{tool} not found: `me-local service` needs {manager}; run `me-local serve` under "
            f"this system's own supervisor instead (`me-local service print` shows a unit to adapt)"
        )
    elif manager == "systemd" and not host.path("/run/systemd/system").is_dir():
        problems.append(
            "systemd is not running on this machine (no /run/systemd/system, e.g. inside a container); "
            "run `me-local serve` directly or under the container's supervisor"
        )
    if scope == "system" and action != "status" and host.uid != 0:
        me_local = shlex.join(host.command())
        problems.append(
            f"--system needs root; run `sudo {me_local} service {action} --system ...`, "
            "or leave out --system to use a service of your own user"
        )
    return problems


def resolve_run_as(host: Host, explicit: str | None, *, strict: bool) -> str:
    name = explicit or host.environ.get("SUDO_USER") or (host.user_name() if host.uid != 0 else None)
    if name is None:
        if strict:
            raise ConfigError(
                "--system needs the account the daemon runs as: pass --run-as USER (a dedicated account, "
                "e.g. one made with `useradd --system --create-home me-local`, is best; `--run-as root` works but "
                "is not advised)"
            )
        name = host.user_name()
    if not _USER_NAME.fullmatch(name):
        raise ConfigError(f"{name!r} is not a user name", key="--run-as")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"there is no user {name!r}; create it (`sudo useradd --system --create-home {name}`) "
            "or pass --run-as with an existing account",
            key="--run-as",
        ) from None
    return name


def existing_groups(names: Iterable[str]) -> tuple[str, ...]:
    found = []
    for name in names:
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        found.append(name)
    return tuple(found)


def resolve_config(explicit: str | None) -> tuple[Path, list[str]]:
    """The config the service will use, absolute, checked now (a bad one would only restart in a loop)."""
    path = find_config(explicit).expanduser().resolve()
    if not path.is_file():
        raise ConfigError("config file not found; pass --config PATH to an existing models.yaml", file=str(path))
    config = load_config(path)
    warnings = []
    for ensemble in config.ensembles.values():
        for member in ensemble.members:
            try:
                member.resolve_path()
            except ConfigError as exc:
                warnings.append(f"warning: {exc}")
    return path, warnings


def build_spec(
    host: Host, manager: Manager, opts: InstallOptions, *, strict: bool, env: Mapping[str, str] | None = None
) -> tuple[ServiceSpec, list[str]]:
    """The spec for these options, and warnings about them."""
    lay = layout(host, manager, opts.scope)
    config, warnings = resolve_config(opts.config)
    argv = [*host.command(), "--log-level", opts.log_level, "serve", "--config", str(config)]
    if opts.listen_host:
        argv += ["--host", opts.listen_host]
    if opts.port is not None:
        argv += ["--port", str(opts.port)]
    argv += opts.serve_args
    for arg in argv:
        _no_newline(arg, "argument")
    run_as = resolve_run_as(host, opts.run_as, strict=strict) if opts.scope == "system" else None
    groups = existing_groups(GPU_GROUPS) if manager == "systemd" and run_as not in (None, "root") else ()
    if opts.sandbox is not None:
        sandbox = opts.sandbox
    else:
        sandbox = opts.scope == "system" or userns_available(host)
    if manager == "systemd" and not sandbox and opts.scope == "user":
        warnings.append("note: sandboxing is off (this machine does not allow unprivileged user namespaces)")
    writable = tuple(Path(p).expanduser().absolute() for p in opts.writable)
    spec = ServiceSpec(lay, tuple(argv), config, run_as, groups, sandbox, writable, dict(env or {}))
    return spec, warnings


def existing_env(lay: Layout) -> dict[str, str]:
    """The environment an earlier install left (kept unless overridden)."""
    try:
        if lay.manager == "systemd":
            assert lay.env_file is not None
            return parse_env_file(lay.env_file.read_text(encoding="utf-8"))
        data = plistlib.loads(lay.service_file.read_bytes())
    except (OSError, UnicodeDecodeError, plistlib.InvalidFileException, ValueError):
        return {}
    env = data.get("EnvironmentVariables") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def plan_install(host: Host, opts: InstallOptions, *, dry_run: bool = False) -> Plan:
    manager = host.manager
    lay = layout(host, manager, opts.scope)
    problems = host_problems(host, manager, opts.scope, "install")
    if opts.scope == "system":
        try:
            resolve_run_as(host, opts.run_as, strict=True)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems and not dry_run:
        raise ConfigError(problems[0])
    env = {**existing_env(lay), **opts.env}
    spec, warnings = build_spec(host, manager, opts, strict=False, env=env if manager == "launchd" else None)
    plan = Plan(notes=warnings, problems=problems)
    existed = lay.service_file.exists()
    plan.mkdir(lay.service_file.parent, 0o755)
    if manager == "systemd":
        assert lay.env_file is not None
        if opts.env or not lay.env_file.exists():
            plan.mkdir(lay.env_file.parent, 0o700)
            plan.steps.append(
                WriteFile(lay.env_file, format_env_file(env).encode(), 0o600, format_env_file(redact_env(env)))
            )
        unit = render_systemd(spec)
        plan.steps.append(WriteFile(lay.service_file, unit.encode(), 0o644))
        ctl = lay.systemctl
        wait = [] if opts.wait else ["--no-block"]
        note = (
            f"starting {UNIT_NAME}: systemctl returns once the models are loaded and the daemon is ready"
            if opts.wait
            else ""
        )
        hint = f"see why with `{lay.journalctl} -e`"
        plan.run(*ctl, "daemon-reload")
        if existed:
            plan.run(*ctl, "enable", UNIT_NAME)
            plan.run(*ctl, "restart", *wait, UNIT_NAME, note=note, hint=hint)
        else:
            plan.run(*ctl, "enable", "--now", *wait, UNIT_NAME, note=note, hint=hint)
        plan.notes += [
            f"logs:   {lay.journalctl} -f",
            "status: me-local service status",
            f"reload: {' '.join(ctl)} reload me-local   (re-reads {spec.config})",
        ]
        if opts.scope == "user" and not host.path("/var/lib/systemd/linger").joinpath(host.user_name()).exists():
            plan.notes.append(
                f"me-local starts when you log in; to start it at boot, run `sudo loginctl enable-linger "
                f"{host.user_name()}`"
            )
    else:
        assert lay.log_file is not None
        plan.mkdir(lay.log_file.parent, 0o755)
        shown = render_launchd(replace(spec, environment=redact_env(spec.environment))).decode()
        target = f"{lay.domain}/{LAUNCHD_LABEL}"
        if existed:
            plan.run("launchctl", "bootout", target, check=False)
        plan.steps.append(WriteFile(lay.service_file, render_launchd(spec), 0o600, shown))
        plan.run("launchctl", "enable", target)
        plan.run("launchctl", "bootstrap", lay.domain, str(lay.service_file), hint=f"see {lay.log_file}")
        plan.notes += [
            f"logs:   tail -f {shlex.quote(str(lay.log_file))}",
            "status: me-local service status",
            f"reload: launchctl kill SIGHUP {target}",
        ]
    return plan


def installed_scope(host: Host, manager: Manager, scope: Scope | None) -> Scope | None:
    """The scope given, or the one me-local is installed in (None: not installed)."""
    if scope is not None:
        return scope
    found: list[Scope] = [s for s in ("user", "system") if layout(host, manager, s).service_file.exists()]
    if len(found) > 1:
        raise ConfigError("me-local is installed both as a user and as a system service; say which: --user or --system")
    return found[0] if found else None


def plan_uninstall(host: Host, scope: Scope | None, *, keep_env: bool = False, dry_run: bool = False) -> Plan:
    manager = host.manager
    found = installed_scope(host, manager, scope)
    plan = Plan()
    if found is None or not layout(host, manager, found).service_file.exists():
        looked: tuple[Scope, ...] = (found,) if found else ("user", "system")
        where = " or ".join(str(layout(host, manager, s).service_file) for s in looked)
        plan.notes.append(f"me-local is not installed as a service (no {where}); nothing to do")
        return plan
    lay = layout(host, manager, found)
    problems = host_problems(host, manager, found, "uninstall")
    if problems and not dry_run:
        raise ConfigError(problems[0])
    plan.problems = problems
    if manager == "systemd":
        assert lay.env_file is not None
        plan.run(*lay.systemctl, "disable", "--now", UNIT_NAME)
        plan.steps.append(RemoveFile(lay.service_file))
        if not keep_env and lay.env_file.exists():
            plan.steps.append(RemoveFile(lay.env_file))
        plan.run(*lay.systemctl, "daemon-reload")
        plan.run(*lay.systemctl, "reset-failed", UNIT_NAME, check=False)
    else:
        plan.run("launchctl", "bootout", f"{lay.domain}/{LAUNCHD_LABEL}", check=False)
        plan.steps.append(RemoveFile(lay.service_file))
        plan.notes.append(f"the logs stay in {lay.log_file.parent if lay.log_file else '-'}")
    return plan


# --------------------------------------------------------------------------- carrying a plan out


def write_file(path: Path, content: bytes, mode: int) -> None:
    """Write atomically (a temporary file in the same directory, then rename), with exactly ``mode``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crash (never followed, were it a symlink)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask does not get a say
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _command_error(step: Run, result: CommandResult) -> MeLocalError:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    detail = lines[-1].strip() if lines else f"exit status {result.returncode}"
    message = f"`{shlex.join(step.argv)}` failed: {detail}"
    if "systemctl" in step.argv[0] and "--user" in step.argv and "bus" in (result.stderr + result.stdout).lower():
        message += (
            "; cannot reach your systemd user manager: run this from a regular login session (not su or sudo), "
            "or install a system service with `sudo me-local service install --system`"
        )
    elif step.hint:
        message += f"; {step.hint}"
    return MeLocalError(message)


def execute(plan: Plan, host: Host, echo: Callable[[str], None]) -> None:
    for step in plan.steps:
        if isinstance(step, MakeDir):
            step.path.mkdir(parents=True, exist_ok=True)
            os.chmod(step.path, step.mode)
        elif isinstance(step, WriteFile):
            write_file(step.path, step.content, step.mode)
            echo(f"wrote {step.path}")
        elif isinstance(step, RemoveFile):
            step.path.unlink(missing_ok=True)
            echo(f"removed {step.path}")
        else:
            if step.note:
                echo(step.note)
            echo(f"$ {shlex.join(step.argv)}")
            result = host.runner(step.argv)
            if step.check and result.returncode != 0:
                raise _command_error(step, result)
    for note in plan.notes:
        echo(note)


def describe(plan: Plan) -> str:
    """The plan as --dry-run prints it."""
    out = ["# dry run: nothing is written or run"]
    out += [f"# would fail: {p}" for p in plan.problems]
    for step in plan.steps:
        if isinstance(step, MakeDir):
            out.append(f"mkdir -p -m {step.mode:04o} {shlex.quote(str(step.path))}")
        elif isinstance(step, WriteFile):
            text = step.shown if step.shown is not None else step.content.decode()
            out.append(f"--- write {step.path} (mode {step.mode:04o}) ---")
            out.append(text.rstrip("\n"))
            out.append("--- end ---")
        elif isinstance(step, RemoveFile):
            out.append(f"rm -f {shlex.quote(str(step.path))}")
        else:
            out.append(f"$ {shlex.join(step.argv)}" + ("" if step.check else "   # failure ignored"))
    out += plan.notes
    return "\n".join(out)


# --------------------------------------------------------------------------- status


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
        raise ConfigError(problems[0])
    head = f"me-local ({found} service): {lay.service_file}"
    if manager == "systemd":
        argv = [*lay.systemctl, "show", UNIT_NAME,
                "--property=LoadState,ActiveState,SubState,UnitFileState,MainPID,StatusText,NRestarts"]
        result = host.runner(argv)
        if result.returncode != 0:
            raise _command_error(Run(tuple(argv)), result)
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


# --------------------------------------------------------------------------- the command line


def _host(ctx: click.Context) -> Host:
    host = ctx.find_object(Host)
    return host if host is not None else Host.current()


def _scope_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--system", "scope", flag_value="system", default=None,
                     help="A system-wide service (root; starts at boot).")(f)
    return click.option("--user", "scope", flag_value="user", default=None,
                        help="A service of your own user (the default for install).")(f)


def _render_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="models.yaml the service serves (default: the one `me-local serve` would find now)."),
        click.option("--host", "listen_host", default=None, help="Address to listen on (default: serve's)."),
        setting_option(PORT, help="Port (default: serve's)."),
        click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True,
                     help="The daemon's log level (info includes the access log)."),
        click.option("--run-as", default=None,
                     help="Account a --system service runs as (default: the user who ran sudo)."),
        click.option("--sandbox/--no-sandbox", default=None,
                     help="ProtectSystem=strict and PrivateTmp=yes (default: on, unless a user service "
                          "cannot have them here)."),
        click.option("--writable", multiple=True, type=click.Path(),
                     help="Another path the sandboxed daemon may write (repeatable)."),
        click.argument("serve_args", nargs=-1, type=click.UNPROCESSED),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group()
def service() -> None:
    """Run `me-local serve` in the background: systemd (Linux) or launchd (macOS).

    Extra arguments after `--` go to `me-local serve`, e.g. `install -- --log-prompts`.
    """


@service.command()
@_scope_options
@_render_options
@click.option("--api-key-file", type=click.File("r"), default=None,
              help="Read ME_LOCAL_API_KEY from this file ('-': stdin), kept readable by its owner only.")
@click.option("--env", "env_items", multiple=True, metavar="NAME=VALUE",
              help="Set an environment variable for the daemon (repeatable).")
@click.option("--no-wait", is_flag=True, help="Do not wait for the models to load (systemctl --no-block).")
@click.option("--dry-run", is_flag=True, help="Print the files and commands; write and run nothing.")
@click.pass_context
def install(ctx: click.Context, scope: Scope | None, config_path: str | None, listen_host: str | None,
            port: int | None, log_level: str, run_as: str | None, sandbox: bool | None, writable: tuple[str, ...],
            serve_args: tuple[str, ...], api_key_file: IO[str] | None, env_items: tuple[str, ...], no_wait: bool,
            dry_run: bool) -> None:
    """Write the service file, then enable and start the service."""
    host = _host(ctx)
    env = parse_env_option(env_items)
    if api_key_file is not None:
        key = api_key_file.read().strip()
        if not key:
            raise ConfigError("the API key file is empty; put the key in it", key="--api-key-file")
        env["ME_LOCAL_API_KEY"] = key
    opts = InstallOptions(scope=scope or "user", config=config_path, listen_host=listen_host, port=port,
                          log_level=log_level, run_as=run_as, sandbox=sandbox, writable=writable,
                          serve_args=serve_args, env=env, wait=not no_wait)
    plan = plan_install(host, opts, dry_run=dry_run)
    if dry_run:
        click.echo(describe(plan))
    else:
        execute(plan, host, click.echo)


@service.command()
@_scope_options
@click.option("--keep-env", is_flag=True, help="Keep the environment file (with the API key).")
@click.option("--dry-run", is_flag=True, help="Print the files and commands; remove and run nothing.")
@click.pass_context
def uninstall(ctx: click.Context, scope: Scope | None, keep_env: bool, dry_run: bool) -> None:
    """Stop and disable the service and remove its files (the logs stay)."""
    host = _host(ctx)
    plan = plan_uninstall(host, scope, keep_env=keep_env, dry_run=dry_run)
    if dry_run:
        click.echo(describe(plan))
    else:
        execute(plan, host, click.echo)


@service.command()
@_scope_options
@click.pass_context
def status(ctx: click.Context, scope: Scope | None) -> None:
    """Whether the service is installed and running. Exit status 0 when running, 3 otherwise."""
    result = service_status(_host(ctx), scope)
    click.echo(result.text)
    ctx.exit(0 if result.running else 3)


@service.command("print")
@click.option("--systemd", "manager", flag_value="systemd", default=None, help="The systemd unit.")
@click.option("--launchd", "manager", flag_value="launchd", default=None, help="The launchd property list.")
@_scope_options
@_render_options
@click.pass_context
def print_command(ctx: click.Context, manager: Manager | None, scope: Scope | None, config_path: str | None,
                  listen_host: str | None, port: int | None, log_level: str, run_as: str | None,
                  sandbox: bool | None, writable: tuple[str, ...], serve_args: tuple[str, ...]) -> None:
    """Print the unit (or plist) install would write for these options (without the environment's secrets)."""
    host = _host(ctx)
    opts = InstallOptions(scope=scope or "user", config=config_path, listen_host=listen_host, port=port,
                          log_level=log_level, run_as=run_as, sandbox=sandbox, writable=writable,
                          serve_args=serve_args)
    spec, _ = build_spec(host, manager or host.manager, opts, strict=False)
    click.echo(render(spec).decode(), nl=False)
