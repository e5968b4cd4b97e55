#!/usr/bin/env python3
"""Where the time of scoring a text goes, against generation on the same model (issue 11's 5x).

On one model file, the bench's prompt text (``me_local.bench.prompts.STORY``, about
``--tokens`` tokens) after the BOS, each repeat runs, interleaved (rotated) so that load from
other processes lands on all alike:

- ``generate``: single-mode generation of ``--gen`` tokens after that text (the bench's
  ``single`` case: a native sampler, one decode per token), tokens/s;
- ``prompt``: the text decoded with logits at the last position only (prompt processing);
- ``score``: the text scored as ``Engine.score`` does (``core.likelihood.token_likelihood``:
  prime the BOS, batched passes with logits at every position, the numpy reduction, the
  units), split into the time inside ``llama_decode`` (and llama.cpp's copy of the rows),
  the numpy reduction, and the rest (Python).

With ``--rows``, the scoring passes are also run with that many rows (as ``SCORE_CHUNK_BYTES``
would give), and ``--n-batch`` the contexts' n_batch (n_ubatch is min(n_batch, 512)).
Prints one JSON object: medians over the repeats, and the ratios against generation.

    PYTHONPATH=src python scripts/profile_scoring.py MODEL.gguf [--tokens 500] [--gen 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from me_local.runtime import prepare

prepare()

from me_local.backends.llama import ContextSettings, LlamaMember, LoadedModel  # noqa: E402
from me_local.backends.llama import context as llama_context  # noqa: E402
from me_local.bench.prompts import PromptMaker  # noqa: E402
from me_local.bench.quiet import wait_quiet  # noqa: E402
from me_local.core import (  # noqa: E402
    DoneEvent,
    SamplingParams,
    generate,
    scoring,
)
from me_local.core.likelihood import token_likelihood  # noqa: E402


class Timed(LlamaMember):
    """A member whose scoring passes are timed: the time spent producing each chunk of rows
    (llama_decode and llama.cpp's copy of the logits out of its graph) is added up."""

    decode_s = 0.0

    def evaluate_rows(self, tokens, cancel=None):  # type: ignore[no-untyped-def]
        it = super().evaluate_rows(tokens, cancel)
        while True:
            t0 = time.perf_counter()
            try:
                rows = next(it)
            except StopIteration:
                return
            Timed.decode_s += time.perf_counter() - t0
            yield rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--rows", type=int, nargs="*", default=[], help="rows per scoring pass to try besides the default")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each timed run, wait up to this many seconds for the CPU to be 90%% idle (0: never)")
    args = ap.parse_args()
    model = LoadedModel(args.model)
    settings = ContextSettings(n_ctx=args.tokens + args.gen + 64, n_batch=args.n_batch, n_threads=args.threads)
    bos = [model.bos] if model.bos >= 0 else [model.eos]
    maker = PromptMaker(lambda s: model.tokenize_text(s), args.tokens)
    toks = model.tokenize_text(maker.text(90000))
    member = Timed("m", model, settings)
    default_bytes = llama_context.SCORE_CHUNK_BYTES

    # the numpy reduction, timed where it runs
    reduce_s = [0.0]
    plain_reduce = scoring._Reducer.reduce

    def timed_reduce(self, rows, targets):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return plain_reduce(self, rows, targets)
        finally:
            reduce_s[0] += time.perf_counter() - t0

    scoring._Reducer.reduce = timed_reduce  # type: ignore[method-assign]

    def run_generate() -> dict[str, float]:
        params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, max_tokens=args.gen, seed=1)
        member.truncate(0)
        done = next(e for e in generate([member], [1.0], [bos + toks], params, mode="single")
                    if isinstance(e, DoneEvent))
        return {"tokens_per_s": done.stats.tokens_per_s, "generated": done.stats.generated_tokens}

    def run_prompt() -> dict[str, float]:
        member.truncate(0)
        member.evaluate(bos)
        t0 = time.perf_counter()
        member.evaluate(toks)
        return {"tokens_per_s": len(toks) / (time.perf_counter() - t0)}

    def run_score(rows: int | None) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            if rows:
                llama_context.SCORE_CHUNK_BYTES = rows * 4 * model.n_vocab
            try:
                member.truncate(0)
                Timed.decode_s = 0.0
                reduce_s[0] = 0.0
                t0 = time.perf_counter()
                tl = token_likelihood([member], [bos], toks)
                wall = time.perf_counter() - t0
            finally:
                llama_context.SCORE_CHUNK_BYTES = default_bytes
            n = tl.scores[0].n
            return {"tokens_per_s": n / wall, "rows_per_pass": rows if rows else member.score_rows,
                    "decode_ms_per_token": Timed.decode_s / n * 1000,
                    "reduce_ms_per_token": reduce_s[0] / n * 1000,
                    "rest_ms_per_token": max(0.0, wall - Timed.decode_s - reduce_s[0]) / n * 1000,
                    "mean_logprob": float(tl.member_logp()[0]) / n}
        return run

    cases: dict[str, Callable[[], dict[str, float]]] = {"generate": run_generate, "prompt": run_prompt,
                                                         "score": run_score(None)}
    for r in args.rows:
        cases[f"score_{r}_rows"] = run_score(r)
    keys = list(cases)
    for k in keys:  # warm-up (output buffers grow to their size)
        cases[k]()
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in keys}
    for rep in range(args.repeats):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for k in order:
            quiet = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else False
            runs[k].append(cases[k]() | {"after_quiet": float(quiet)})
    member.close()
    load_after = os.getloadavg()[0]

    def med(k: str, field: str) -> float:
        return round(statistics.median(r[field] for r in runs[k]), 3)

    gen = med("generate", "tokens_per_s")
    out: dict[str, Any] = {"model": args.model.name, "n_vocab": model.n_vocab, "tokens": len(toks),
                           "threads": settings.threads(), "n_batch": args.n_batch,
                           "loadavg_before_after": [load_before, load_after],
                           "generate_tokens_per_s": gen, "prompt_tokens_per_s": med("prompt", "tokens_per_s"),
                           "prompt/generation": round(med("prompt", "tokens_per_s") / gen, 2)}
    for k in keys:
        if not k.startswith("score"):
            continue
        out[k] = {f: med(k, f) for f in runs[k][0] if f != "after_quiet"}
        out[k]["score/generation"] = round(out[k]["tokens_per_s"] / gen, 2)
        out[k]["spread_tokens_per_s"] = [round(min(r["tokens_per_s"] for r in runs[k]), 1),
                                         round(max(r["tokens_per_s"] for r in runs[k]), 1)]
    quiet_runs = sum(r["after_quiet"] for k in keys for r in runs[k])
    out["runs_after_quiet"] = f"{quiet_runs:.0f} of {args.repeats * len(keys)}"
    out["generate_spread"] = [round(min(r["tokens_per_s"] for r in runs["generate"]), 1),
                              round(max(r["tokens_per_s"] for r in runs["generate"]), 1)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
