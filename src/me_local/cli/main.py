"""The command line: generate, chat, models (and serve, service, bench as they land).

Errors from the tree in :mod:`me_local.errors` are translated here: one line on
stderr naming the fix, the error's exit status, no traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .. import __version__
from .. import settings as S
from ..config import load_config, parse_weights
from ..errors import MeLocalError
from .options import setting_option
from .report import format_stats

if TYPE_CHECKING:
    from me_local.engine import Engine

MEMBER_COLOURS = ["cyan", "magenta", "yellow", "green", "blue", "red", "bright_cyan", "bright_magenta"]


#: Commands that live in their own modules, imported only when used (keeps `generate` fast to start).
LAZY_COMMANDS = {
    "serve": "me_local.server.command:serve",
    "service": "me_local.service.command:service",
    "bench": "me_local.bench.command:bench",
    "eval": "me_local.evaluation.command:eval_command",
    "tune": "me_local.evaluation.command:tune",
}


class Cli(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names.update(n for n in LAZY_COMMANDS if self.get_command(ctx, n) is not None)
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            import importlib

            module, _, attr = LAZY_COMMANDS[name].partition(":")
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name and module.startswith(exc.name):
                    return None  # that part of me-local is not built yet
                raise
            command: click.Command = getattr(mod, attr)
            return command
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeLocalError as exc:
            click.echo(f"me-local: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="me-local")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Logging on stderr.")
def cli(log_level: str) -> None:
    """me-local: serve an ensemble of GGUF models as one model (mixture-model-like ensembling)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


SAMPLING_FLAGS = (S.MAX_TOKENS, S.TEMPERATURE, S.TOP_K, S.TOP_P, S.MIN_P, S.SEED)
"""The sampling settings generate and chat take as flags, in the order --help lists them
(their flag, type, bounds and help come from :mod:`me_local.settings`)."""
PENALTY_FLAGS = (*S.PENALTIES, S.LOGIT_BIAS)
"""The penalties' and the logit bias's flags, after those; the commands take them as ``**penalties``."""


def sampling_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The flags generate and chat share."""
    options = [
        click.option("--config", "config_path", type=click.Path(),
                     help="models.yaml to use (default: $ME_LOCAL_CONFIG, ./models.yaml, "
                          "~/.config/me-local/models.yaml, then the packaged one)."),
        click.option("--ensemble", "-e", default=None, help="Ensemble name (default: `default`)."),
        setting_option(S.MODE, help="Decoding mode (default: the ensemble's)."),
        setting_option(S.GRANULARITY, help="What `me` draws a member for: each token or each word "
                                           "(default: the ensemble's; word when vocabularies differ)."),
        setting_option(S.MEMBER),
        setting_option(S.WEIGHT, dest="weights", type=click.STRING, help="Override weights: name=0.7,name=0.3."),
        *(setting_option(s) for s in SAMPLING_FLAGS),
        *(setting_option(s) for s in PENALTY_FLAGS),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _engine(config_path: str | None) -> Engine:
    from ..engine import Engine

    return Engine(load_config(config_path))


@cli.command()
@click.argument("prompt")
@sampling_options
@setting_option(S.STOP, help="Stop string (repeatable); never printed.")
@click.option("--raw", is_flag=True, help="No chat template: the prompt is the text to continue.")
@click.option("--show-members", is_flag=True, help="Colour each token by the member that produced it.")
@click.option("--stats", "show_stats", is_flag=True, help="Print timings and per-member figures on stderr.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per token, then a final summary.")
def generate(prompt: str, config_path: str | None, ensemble: str | None, mode: str | None,
             granularity: str | None, member: str | None, weights: str | None, max_tokens: int | None,
             temperature: float | None, top_k: int | None, top_p: float | None, min_p: float | None, seed: int | None,
             stop: tuple[str, ...], raw: bool, show_members: bool, show_stats: bool, as_json: bool,
             **penalties: Any) -> None:
    """Generate a reply to PROMPT (or continue it, with --raw) and stream it to stdout."""
    from ..core import DoneEvent
    from ..engine import Request, sampling_params

    engine = _engine(config_path)
    cfg = engine.config.get(ensemble)
    params = sampling_params(cfg.sampling, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, seed=seed, stop=tuple(stop) or None,
                             logprobs=True if as_json else None, **penalties)
    request = Request(
        ensemble=cfg.name,
        messages=None if raw else [{"role": "user", "content": prompt}],
        prompt=prompt if raw else None,
        params=params,
        mode=mode,
        weights=parse_weights(weights) if weights else None,
        member=member,
        granularity=granularity,
    )
    colours = {m.name: MEMBER_COLOURS[i % len(MEMBER_COLOURS)] for i, m in enumerate(cfg.members)}
    events = engine.generate(request)
    done = None
    try:
        for ev in events:
            if isinstance(ev, DoneEvent):
                done = ev
                break
            if as_json:
                click.echo(json.dumps({"id": ev.id, "text": ev.text, "member": ev.member, "logprob": ev.logprob},
                                      ensure_ascii=False))
            elif show_members and ev.member is not None:
                click.echo(click.style(ev.text, fg=colours[ev.member]), nl=False)
            else:
                click.echo(ev.text, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        events.close()
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    assert done is not None
    if as_json:
        if done.text:
            click.echo(json.dumps({"id": None, "text": done.text, "member": None, "logprob": None},
                                  ensure_ascii=False))
        click.echo(json.dumps({"done": True, "finish_reason": done.finish_reason, "stats": done.stats.to_dict()}))
    else:
        click.echo(done.text)
        if show_members:
            legend = "  ".join(click.style(f"■ {name}", fg=c) for name, c in colours.items())
            click.echo(legend, err=True)
    if show_stats:
        click.echo(format_stats(done.stats, done.finish_reason), err=True)


@cli.command()
@sampling_options
@click.option("--url", default=None, help="Chat through a running `me-local serve` at this URL.")
@click.option("--api-key", envvar="ME_LOCAL_API_KEY", default=None, help="API key for --url.")
def chat(config_path: str | None, ensemble: str | None, mode: str | None, granularity: str | None,
         member: str | None,
         weights: str | None, max_tokens: int | None, temperature: float | None, top_k: int | None,
         top_p: float | None, min_p: float | None, seed: int | None, url: str | None, api_key: str | None,
         **penalties: Any) -> None:
    """Chat with an ensemble. /help inside lists the commands."""
    from .chat import ChatSession, InProcess

    overrides = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     min_p=min_p, seed=seed, mode=mode, member=member, granularity=granularity,
                     weights=parse_weights(weights) if weights else None, **penalties)
    if url:
        from .remote import Remote

        remote = Remote(url, ensemble=ensemble, api_key=api_key)
        try:
            ChatSession(remote, overrides).run()
        finally:
            remote.close()
        return
    engine = _engine(config_path)
    ChatSession(InProcess(engine, engine.config.get(ensemble).name), overrides).run()


@cli.command()
@click.option("--config", "config_path", type=click.Path(), help="models.yaml to use.")
def models(config_path: str | None) -> None:
    """List each ensemble with its members, files, sizes and vocabularies, and any problem."""
    from .models import describe

    config = load_config(config_path)
    text, ok = describe(config)
    click.echo(text)
    if not ok:
        sys.exit(2)


def main() -> None:
    from ..logs import enable_crash_traces
    from ..runtime import prepare

    prepare()  # before llama_cpp loads: libgomp and ggml read their settings once

    enable_crash_traces()  # a native crash in llama.cpp leaves a Python stack on stderr, never silence
    cli(prog_name="me-local")

