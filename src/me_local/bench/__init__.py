"""``me-local bench``: what mixture-model ensembling buys, measured on this machine.

One run measures, on the same ensemble(s): each member alone (``single``), the
conventional ensemble (``ce``), the mixture-model-like ensemble (``me``, token by
token and word by word; word by word only, and no ``ce``, where the members'
vocabularies differ), and
llama-cpp-python's own ``create_completion(stream=True)`` loop on the same model
file and settings (the reference for ``single``), and each member scoring the
prompt text as evaluation does (``eval``, against its ``single`` generation
speed), interleaved so that machine noise hits every case alike. The modules, in the order they build on each
other: :mod:`.stats` (medians, quartiles, ratios), :mod:`.prompts` (the text
generated from), :mod:`.plan` (the cases and their order), :mod:`.memory`
(resident memory in fresh processes), :mod:`.runs` (the runner), :mod:`.plot`
and :mod:`.report` (bench.png, bench.json, the table, the targets) and
:mod:`.command` (the click command). :mod:`.loadrun` is ``--server URL``: a load
test against a running daemon, which shares the statistics and the prompts; it
is imported only when used (it needs aiohttp, which the in-process bench does
not load). The names below are what ``scripts/`` and the tests import.
"""

from __future__ import annotations

from .command import bench, run_and_print
from .plan import BASELINE, bench_plan, default_config, interleave, plan_cases, vocabularies_shared
from .plot import PLOT_HINT, write_chart
from .report import evaluate_targets, format_report, format_targets, run_bench
from .runs import BenchRunner, BenchSettings, ensemble_report
from .stats import (
    Summary,
    bytes_per_second,
    median,
    mixture_speed,
    paired_ratio,
    percentile,
    quantile,
    ratio,
)

__all__ = [
    "BASELINE",
    "PLOT_HINT",
    "BenchRunner",
    "BenchSettings",
    "Summary",
    "bench",
    "bench_plan",
    "bytes_per_second",
    "default_config",
    "ensemble_report",
    "evaluate_targets",
    "format_report",
    "format_targets",
    "interleave",
    "median",
    "mixture_speed",
    "paired_ratio",
    "percentile",
    "plan_cases",
    "quantile",
    "ratio",
    "run_and_print",
    "run_bench",
    "vocabularies_shared",
    "write_chart",
]
