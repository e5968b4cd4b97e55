"""``me-local service``: the click group and its commands (install, uninstall, status, print).

Each command turns its options into :class:`~me_local.service.plan.InstallOptions`
or a scope, asks :mod:`~me_local.service.plan` (or :mod:`~me_local.service.status`)
for the result, and prints it: a plan is printed by ``--dry-run`` and carried out
otherwise. The :class:`~me_local.service.host.Host` comes from ``ctx.obj`` when
the caller gives one (tests do), else it is this machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import IO, Any

import click

from ..cli.options import setting_option
from ..errors import UsageError
from ..logs import LEVELS
from ..settings import HOST, PORT
from .host import Host, Manager, Scope
from .plan import InstallOptions, Plan, build_spec, describe, execute, plan_install, plan_uninstall
from .render import ENV_NAME, render
from .status import service_status


def parse_env_option(values: Iterable[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not ENV_NAME.fullmatch(name):
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--env")
        env[name] = value
    return env


def _host(ctx: click.Context) -> Host:
    host = ctx.find_object(Host)
    return host if host is not None else Host.current()


def _scope_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--system", "scope", flag_value="system", default=None,
                     help="A system-wide service (root; starts at boot).")(f)
    return click.option("--user", "scope", flag_value="user", default=None,
                        help="A service of your own user (the default for install).")(f)


def _render_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that shape the rendered service; the command gets them as one ``opts: InstallOptions``
    (with ``--user``/``--system`` from :func:`_scope_options`, user by default)."""

    @functools.wraps(f)
    def with_opts(*args: Any, scope: Scope | None, config_path: str | None, listen_host: str | None,
                  port: int | None, log_level: str, run_as: str | None, sandbox: bool | None,
                  writable: tuple[str, ...], serve_args: tuple[str, ...], **kwargs: Any) -> Any:
        opts = InstallOptions(scope=scope or "user", config=config_path, listen_host=listen_host, port=port,
                              log_level=log_level, run_as=run_as, sandbox=sandbox, writable=writable,
                              serve_args=serve_args)
        return f(*args, opts=opts, **kwargs)

    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="models.yaml the service serves (default: the one `me-local serve` would find now)."),
        setting_option(HOST, dest="listen_host", help="Address to listen on (default: serve's)."),
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
    wrapped: Callable[..., Any] = with_opts
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped


def _print_or_execute(plan: Plan, host: Host, dry_run: bool) -> None:
    if dry_run:
        click.echo(describe(plan))
    else:
        execute(plan, host, click.echo)


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
def install(ctx: click.Context, opts: InstallOptions, api_key_file: IO[str] | None, env_items: tuple[str, ...],
            no_wait: bool, dry_run: bool) -> None:
    """Write the service file, then enable and start the service."""
    host = _host(ctx)
    env = parse_env_option(env_items)
    if api_key_file is not None:
        key = api_key_file.read().strip()
        if not key:
            raise UsageError("--api-key-file: the API key file is empty; put the key in it")
        env["ME_LOCAL_API_KEY"] = key
    plan = plan_install(host, replace(opts, env=env, wait=not no_wait), dry_run=dry_run)
    _print_or_execute(plan, host, dry_run)


@service.command()
@_scope_options
@click.option("--keep-env", is_flag=True, help="Keep the environment file (with the API key).")
@click.option("--dry-run", is_flag=True, help="Print the files and commands; remove and run nothing.")
@click.pass_context
def uninstall(ctx: click.Context, scope: Scope | None, keep_env: bool, dry_run: bool) -> None:
    """Stop and disable the service and remove its files (the logs stay)."""
    host = _host(ctx)
    _print_or_execute(plan_uninstall(host, scope, keep_env=keep_env, dry_run=dry_run), host, dry_run)


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
def print_command(ctx: click.Context, manager: Manager | None, opts: InstallOptions) -> None:
    """Print the unit (or plist) install would write for these options (without the environment's secrets)."""
    host = _host(ctx)
    spec, _ = build_spec(host, manager or host.manager, opts, strict=False)
    click.echo(render(spec).decode(), nl=False)
