#!/usr/bin/env python3
"""The engine's speed targets (issue 2), measured side by side in one run.

On the default model as two and as three members sharing its weights, with a
500-token prompt: single mode against llama-cpp-python's own create_completion
loop, me against ce and against single, and the time to first token of me
against ce. Prints every target with PASS or MISS and exits 1 if any is missed.
A thin wrapper over ``me_local.bench`` (the same run as ``me-local bench``).

    .venv/bin/python scripts/bench_engine.py [--tokens 128] [--repeats 5] [--out bench-out]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from me_local.bench import BenchSettings, bench_plan, run_and_print
from me_local.runtime import prepare


@click.command()
@click.option("--tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=4), default=500, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bench-out", show_default=True)
@click.option("--memory/--no-memory", default=True, show_default=True, help="Also measure resident memory.")
def main(tokens: int, repeats: int, prompt_tokens: int, out_dir: str, memory: bool) -> None:
    prepare()  # before the bench loads llama_cpp, as `me-local bench` does
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config, names = bench_plan(None, None, prompt_tokens, tokens)
    # the engine's targets only: evaluation against generation (issue 11) is `me-local bench`'s
    settings = BenchSettings(tokens=tokens, repeats=repeats, prompt_tokens=prompt_tokens, memory=memory,
                             evaluation=False)
    _, targets = run_and_print(config, names, settings, Path(out_dir), "speed targets (issue 2; memory: issue 5):")
    sys.exit(0 if all(t.passed for t in targets) else 1)


if __name__ == "__main__":
    main()
