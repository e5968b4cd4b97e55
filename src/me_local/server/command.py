"""``me-local serve``: the click command (registered lazily by :mod:`me_local.cli`)."""

from __future__ import annotations

import logging
import sys

import click

from ..cli.options import setting_option
from ..config import load_config
from ..settings import BODY_TIMEOUT, HEADER_TIMEOUT, HOST, MAX_BODY_SIZE, PORT, WRITE_TIMEOUT
from .resources import raise_open_file_limit
from .runner import Server, ServerSettings, config_loader

log = logging.getLogger("me_local.server")


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="models.yaml to serve (default: $ME_LOCAL_CONFIG, ./models.yaml, "
                   "~/.config/me-local/models.yaml, then the packaged one).")
@setting_option(HOST, default=HOST.default, show_default=True)
@setting_option(PORT, default=PORT.default, show_default=True,
                help="Port to listen on (0: any free port, printed at start-up).")
@click.option("--api-key", envvar="ME_LOCAL_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every endpoint but /health [env: ME_LOCAL_API_KEY].")
@click.option("--allow-origin", multiple=True,
              help="Browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable; * for any).")
@click.option("--allow-host", multiple=True,
              help="Extra Host name accepted besides loopback ones, e.g. mybox.lan (repeatable; * for any).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@setting_option(MAX_BODY_SIZE, default=MAX_BODY_SIZE.default, show_default=True)
@click.option("--log-prompts", is_flag=True, help="Put each request's prompt in its access-log line (off: never).")
@setting_option(HEADER_TIMEOUT, default=HEADER_TIMEOUT.default, show_default=True)
@setting_option(BODY_TIMEOUT, default=BODY_TIMEOUT.default, show_default=True)
@setting_option(WRITE_TIMEOUT, default=WRITE_TIMEOUT.default, show_default=True)
def serve(config_path: str | None, host: str, port: int, api_key: str | None, allow_origin: tuple[str, ...],
          allow_host: tuple[str, ...], insecure: bool, max_body_size: int, log_prompts: bool,
          header_timeout: float, body_timeout: float, write_timeout: float) -> None:
    """Serve the ensembles over HTTP: OpenAI- and Ollama-compatible APIs on one port.

    Stop it with Ctrl+C or SIGTERM (streams in flight end with a final chunk);
    SIGHUP re-reads models.yaml (a broken file is logged and the old models keep serving).
    """
    from ..logs import enable_crash_traces, setup_logging
    from ..service.sdnotify import SystemdHooks

    setup_logging(secrets=[api_key] if api_key else ())  # one line per event; the key never appears
    enable_crash_traces()  # stderr is the service's log: a native crash leaves every thread's stack there
    settings = ServerSettings(host=host, port=port, api_key=api_key, allow_origins=allow_origin,
                              allow_hosts=allow_host, insecure=insecure, max_body_bytes=max_body_size,
                              log_prompts=log_prompts, header_timeout=header_timeout, body_timeout=body_timeout,
                              write_timeout=write_timeout)
    settings.check()
    raised = raise_open_file_limit()
    if raised is not None:
        log.info("raised the open-file limit from %d to %d", *raised)
    load_config(config_path)  # a broken models.yaml fails here, before binding
    server = Server(settings, config_loader(config_path))
    server.on_ready.append(_announce)
    hooks = SystemdHooks.attach(server)  # READY=1 / STOPPING=1 / watchdog; no-ops without NOTIFY_SOCKET
    server.reloader = hooks.reload
    server.run()


def _announce(server: Server) -> None:
    click.echo(f"me-local: {server.describe()}", err=True)
    sys.stderr.flush()
