"""Install and uninstall as plans: lists of steps, made first, carried out or printed second.

A :class:`Plan` is a list of steps (:class:`MakeDir`, :class:`WriteFile` with its
mode, :class:`RemoveFile`, :class:`Run` a command), notes printed after them, and
the problems that would make it fail on this host. :func:`plan_install` and
:func:`plan_uninstall` make one from :class:`InstallOptions` and a
:class:`~me_local.service.host.Host` without changing anything; ``--dry-run``
prints it with :func:`describe`, otherwise :func:`execute` performs it (files
written atomically with exactly their mode, commands through the host's runner).
What the options leave open is resolved here: the config file (checked now),
the account a system service runs as, the GPU groups, the sandbox.
"""

from __future__ import annotations

import grp
import os
import plistlib
import pwd
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import find_config, load_config
from ..errors import ConfigError, MeLocalError, ServiceError, UsageError
from .host import CommandResult, Host, Manager, Scope, user_manager_reachable, userns_available
from .layout import LAUNCHD_LABEL, UNIT_NAME, Layout, layout
from .render import (
    ServiceSpec,
    format_env_file,
    no_newline,
    parse_env_file,
    redact_env,
    render_launchd,
    render_systemd,
)

#: Groups that own GPU device nodes (/dev/dri/renderD*, /dev/kfd, some /dev/nvidia*) on common distributions.
GPU_GROUPS = ("video", "render")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")

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
            raise UsageError(
                "--system needs the account the daemon runs as: pass --run-as USER (a dedicated account, "
                "e.g. one made with `useradd --system --create-home me-local`, is best; `--run-as root` works but "
                "is not advised)"
            )
        name = host.user_name()
    if not _USER_NAME.fullmatch(name):
        raise UsageError(f"--run-as: {name!r} is not a user name")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise UsageError(
            f"--run-as: there is no user {name!r}; create it (`sudo useradd --system --create-home {name}`) "
            "or pass --run-as with an existing account"
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
                member.resolve_path(assemble=False)  # the service assembles into its own cache
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
        no_newline(arg, "argument")
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
        except UsageError as exc:
            problems.append(str(exc))
    if problems and not dry_run:
        raise ServiceError(problems[0])
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
        raise UsageError("me-local is installed both as a user and as a system service; say which: --user or --system")
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
        raise ServiceError(problems[0])
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


def command_error(step: Run, result: CommandResult, host: Host) -> MeLocalError:
    """The error for a failed step: the command, the last line it printed, and what to do."""
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    detail = lines[-1].strip() if lines else f"exit status {result.returncode}"
    message = f"`{shlex.join(step.argv)}` failed: {detail}"
    if "systemctl" in step.argv[0] and "--user" in step.argv and not user_manager_reachable(host):
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
                raise command_error(step, result, host)
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


