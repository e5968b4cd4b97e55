"""``me-local bench``: the click command, in-process or (``--server URL``) against a daemon.

In process it plans the cases (:func:`~me_local.bench.plan.bench_plan`), runs
them under a progress bar and prints the table and the targets
(:func:`run_and_print`, which ``scripts/bench_engine.py`` calls too). With
``--server`` it runs :mod:`~me_local.bench.loadrun` instead, imported only then.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from ..config import Config
from ..settings import KV_CACHE_TYPE
from .plan import BASELINE, bench_plan
from .plot import PLOT_HINT
from .report import Target, evaluate_targets, format_report, format_targets, run_bench
from .runs import BenchRunner, BenchSettings


def run_and_print(config: Config, names: Sequence[str], settings: BenchSettings, out: Path,
                  targets_heading: str) -> tuple[list[Path], list[Target]]:
    """The in-process bench as ``me-local bench`` runs it: a progress bar on stderr, bench.json (and
    bench.png) in ``out``, then the table, the targets under ``targets_heading`` and the files written.
    Returns the files written and the targets."""
    runner = BenchRunner(config, names, settings)
    with click.progressbar(length=runner.total_steps, label="bench", file=sys.stderr,
                           item_show_func=lambda item: item) as bar:
        result, written = run_bench(runner, out, progress=lambda label: bar.update(1, label))
    click.echo(format_report(result))
    targets = evaluate_targets(result)
    if targets:
        click.echo(f"\n{targets_heading}")
        click.echo(format_targets(targets))
    for path in written:
        click.echo(f"wrote {path}")
    return written, targets


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="models.yaml to use (with neither --config nor --ensemble: the default model as 2 and 3 members).")
@click.option("--ensemble", "-e", default=None, help="Ensemble to bench.")
@click.option("--tokens", "-n", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens to generate per run.")
@click.option("--repeats", "-r", type=click.IntRange(min=1), default=5, show_default=True,
              help="Runs per mode (interleaved).")
@click.option("--prompt-tokens", type=click.IntRange(min=4), default=500, show_default=True,
              help="Prompt length in tokens (about).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for bench.json and bench.png.")
@click.option("--no-baseline", is_flag=True, help=f"Skip the {BASELINE} create_completion reference.")
@click.option("--no-memory", is_flag=True, help="Skip the resident-memory measurement.")
@click.option("--no-eval", is_flag=True,
              help="Skip the evaluation cases (each member scoring the prompt text, against its generation speed).")
@click.option("--kv-cache-type", type=click.Choice(KV_CACHE_TYPE.choices), default=None,
              help="KV cache type of the default-model ensembles (default: the shipped default ensemble's, "
                   "like its n_ctx; a config's ensembles set their own).")
@click.option("--server", "server_url", default=None, metavar="URL",
              help="Load-test a running `me-local serve` at URL instead.")
@click.option("--clients", "-c", type=click.IntRange(min=1), default=4, show_default=True,
              help="Concurrent streaming clients (with --server).")
@click.option("--requests", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests in all (with --server).")
@click.option("--api-key", envvar="ME_LOCAL_API_KEY", default=None, help="API key for --server.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Per request, with --server: a request still streaming after this is cancelled.")
def bench(config_path: str | None, ensemble: str | None, tokens: int, repeats: int, prompt_tokens: int,
          out_dir: str, no_baseline: bool, no_memory: bool, no_eval: bool, server_url: str | None, clients: int,
          requests: int, api_key: str | None, timeout: float, kv_cache_type: str | None) -> None:
    """Measure single, ce and me side by side (or load-test a daemon with --server).

    Members sharing a vocabulary: me token by token and word by word. Members with
    different vocabularies: me word by word, no ce, compared in bytes/s."""
    out = Path(out_dir)
    if server_url:
        from .loadrun import LoadSettings, format_load_report, run_load_sync

        load = LoadSettings(url=server_url, clients=clients, requests=requests, tokens=tokens,
                            prompt_tokens=prompt_tokens, model=ensemble, api_key=api_key, timeout=timeout)
        with click.progressbar(length=requests, label="load run", file=sys.stderr) as bar:
            report = run_load_sync(load, progress=lambda: bar.update(1))
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-load.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        click.echo(format_load_report(report))
        click.echo(f"wrote {out / 'bench-load.json'}")
        if report["completed"] == 0:
            raise click.ClickException(
                f"no request to {server_url} completed; is `me-local serve` running there? "
                f"(first error: {report.get('first_error') or 'none'})"
            )
        return

    config, names = bench_plan(config_path, ensemble, prompt_tokens, tokens, kv_cache_type)
    settings = BenchSettings(tokens=tokens, repeats=repeats, prompt_tokens=prompt_tokens,
                             baseline=not no_baseline, memory=not no_memory, evaluation=not no_eval)
    written, _ = run_and_print(config, names, settings, out, "targets (this machine):")
    if not any(p.suffix == ".png" for p in written):
        click.echo(f"no chart: matplotlib is not installed ({PLOT_HINT})")
