#!/usr/bin/env python3
"""Scoring speed against generation speed on one model (the likelihood foundation's bench).

Scoring: a text of about ``--tokens`` tokens after a BOS, in one batched pass with logits at
every position (core.scoring.score: decode + numpy reduction), for several chunk sizes.
Generation: core.generate in single mode at temperature 1 for ``--gen`` tokens (the real
ME path: a native sampler, one decode per token). Prints one JSON object.

    PYTHONPATH=src python scripts/bench_scoring.py MODEL.gguf [--tokens 1000] [--gen 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from me_local.runtime import prepare

prepare()

from me_local.backends.llama import ContextSettings, LlamaMember, LoadedModel  # noqa: E402
from me_local.backends.llama import context as llama_context  # noqa: E402
from me_local.core import DoneEvent, SamplingParams, generate  # noqa: E402
from me_local.core.scoring import prime, score  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sample_text(n_chars: int) -> str:
    """English prose and some code from the repository's own docs (README, docs/*.md)."""
    parts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(parts)[:n_chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, nargs="*", default=[],
                    help="rows per scoring decode to try besides the default")
    args = ap.parse_args()
    model = LoadedModel(args.model)
    text = sample_text(args.tokens * 6)
    toks = model.tokenize_text(text)[: args.tokens]
    settings = ContextSettings(n_ctx=args.tokens + 64, n_batch=512, n_threads=args.threads)
    out: dict[str, object] = {"model": args.model.name, "n_vocab": model.n_vocab, "tokens": len(toks)}
    bos = [model.bos] if model.bos >= 0 else model.tokenize("\n", add_special=False)

    def run_score(rows: int | None) -> dict[str, float]:
        default = llama_context.SCORE_CHUNK_BYTES
        if rows:
            llama_context.SCORE_CHUNK_BYTES = rows * 4 * model.n_vocab
        m = LlamaMember("m", model, settings)
        try:
            prime(m, bos, len(toks))
            chunk = m.score_rows
            # the decode alone (rows consumed without reduction), then the full score
            t0 = time.perf_counter()
            for _ in m.evaluate_rows(toks):
                pass
            t_decode = time.perf_counter() - t0
            prime(m, bos, len(toks))
            t0 = time.perf_counter()
            s = score(m, toks)
            t_score = time.perf_counter() - t0
            prime(m, bos, len(toks))  # prompt processing as generation does it: logits at the end only
            t0 = time.perf_counter()
            m.evaluate(toks)
            t_prompt = time.perf_counter() - t0
        finally:
            m.close()
            llama_context.SCORE_CHUNK_BYTES = default
        return {"rows_per_decode": chunk, "prompt_eval_tok_s": round(len(toks) / t_prompt, 1),
                "decode_tok_s": round(len(toks) / t_decode, 1),
                "score_tok_s": round(len(toks) / t_score, 1), "score_s": round(t_score, 3),
                "mean_logprob": round(float(s.logprob.mean()), 4)}

    def run_generate() -> float:
        m = LlamaMember("m", model, settings)
        try:
            params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=args.gen, seed=1)
            prompt = bos + toks[:32]
            done = next(e for e in generate([m], [1.0], [prompt], params, mode="single") if isinstance(e, DoneEvent))
            return round(done.stats.tokens_per_s, 1)
        finally:
            m.close()

    out["generate_tok_s"] = run_generate()
    out["score"] = [run_score(None)] + [run_score(r) for r in args.rows]
    out["generate_tok_s_again"] = run_generate()
    best = max(float(r["score_tok_s"]) for r in out["score"])  # type: ignore[union-attr]
    gen = (float(out["generate_tok_s"]) + float(out["generate_tok_s_again"])) / 2  # type: ignore[arg-type]
    out["ratio_score_to_generate"] = round(best / gen, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
