"""Click options built from :mod:`me_local.settings`: a setting's flag, type, bounds
and help come from its row of the table, so the command line refuses what
models.yaml and the APIs refuse."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from ..settings import Setting, parse_logit_bias


class FiniteFloat(click.FloatRange):
    """A float in a range that also refuses nan and inf (which compare false to any bound)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


def click_type(setting: Setting[Any]) -> Any:
    """The click parameter type that accepts exactly the setting's values."""
    if setting.choices:
        return click.Choice(setting.choices)
    if setting.type is int:
        return click.IntRange(None if setting.lo is None else int(setting.lo),
                              None if setting.hi is None else int(setting.hi))
    if setting.type is float:
        return FiniteFloat(setting.lo, setting.hi)
    if setting.type is bool:
        return click.BOOL
    return click.STRING


def _at_most(setting: Setting[Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if setting.hi is not None and len(value) > setting.hi:
            raise click.BadParameter(f"{len(value)} given; at most {setting.hi} are allowed.", ctx, param)
        return value

    return check


def _logit_bias(ctx: click.Context, param: click.Parameter, value: Any) -> dict[int, float] | None:
    """Repeated ``--logit-bias ID=BIAS`` (or ``ID=BIAS,ID=BIAS``) as one mapping; None when not given."""
    out: dict[int, float] = {}
    for text in value:
        try:
            out.update(parse_logit_bias(text))
        except ValueError as exc:
            raise click.BadParameter(f"{exc}.", ctx, param) from None
    return out or None


def setting_option(setting: Setting[Any], *, dest: str | None = None, **overrides: Any) -> Callable[[Any], Any]:
    """``click.option`` for a setting's flag. The parameter is named after the setting (or
    ``dest``) and defaults to None (the ensemble's or the program's default applies) unless
    ``default`` is given; ``overrides`` replace any other keyword (``help``, ``type``...)."""
    if setting.flag is None:
        raise ValueError(f"setting {setting.name!r} has no command-line flag")
    decls = [setting.flag, *([setting.short] if setting.short else []), dest or setting.name]
    kwargs: dict[str, Any] = {"type": click_type(setting), "default": None, "help": setting.help}
    if setting.type is tuple:
        kwargs.update(type=click.STRING, multiple=True, callback=_at_most(setting))
        del kwargs["default"]
    elif setting.type is dict:  # --logit-bias ID=BIAS, repeatable
        kwargs.update(type=click.STRING, multiple=True, callback=_logit_bias, metavar="ID=BIAS")
        del kwargs["default"]
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)
