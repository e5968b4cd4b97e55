"""Resident memory of members that share one model file, measured in fresh processes.

:func:`measure_shared_memory` starts three interpreters that hold 0 (the
libraries only), 1 and 2 members on the same file, lets each evaluate a short
prompt so that the weights are paged in and every context's buffers exist, and
reports their VmRSS (with its file-backed and anonymous parts) and the ratio of
two members to one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..config import parse_config
from ..settings import KV_CACHE_TYPE, N_BATCH
from .stats import ratio

log = logging.getLogger("me_local.bench")

_PROBE = textwrap.dedent(
    """
    import json, sys
    from me_local.runtime import prepare; prepare()
    from me_local.bench.memory import _memory_probe
    print(json.dumps(_memory_probe(json.loads(sys.argv[1]))))
    """
)


def _rss() -> dict[str, float]:
    """This process's resident memory in MiB: total, file-backed (mapped weights) and anonymous."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssFile", "RssAnon"):
                    out[k] = int(v.split()[0]) / 1024.0
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = peak / (2**20 if sys.platform == "darwin" else 1024.0)
        out["VmRSS"] = out["VmHWM"]
    return out


def _memory_probe(args: Mapping[str, Any]) -> dict[str, Any]:
    """Runs in a fresh interpreter: load ``k`` members sharing one file, let each evaluate a
    short prompt (so weights are paged in and every context's buffers exist), report RSS."""
    import me_local.backends.llama  # noqa: F401  (the libraries count in every measurement)

    from ..core import SamplingParams
    from ..engine import Engine, Request, collect

    k = int(args["members"])
    if k > 0:
        member: dict[str, Any] = {"path": args["path"], "n_gpu_layers": int(args.get("n_gpu_layers", 0)),
                                  "repack": args.get("repack", "auto"), "mmap": bool(args.get("mmap", False))}
        if args.get("n_threads"):
            member["n_threads"] = args["n_threads"]
        ensemble = {"n_ctx": args["n_ctx"], "n_batch": args["n_batch"],
                    "kv_cache_type": args.get("kv_cache_type", KV_CACHE_TYPE.default),
                    "members": [{"name": f"m{i}", **member} for i in range(k)]}
        text = yaml.safe_dump({"ensembles": {"e": ensemble}}, sort_keys=False)
        engine = Engine(parse_config(text, Path.cwd() / "<memory probe>"))
        mode = "ce" if k > 1 else "single"
        collect(engine.generate(Request(ensemble="e", prompt="Hello there, how are you?", mode=mode,
                                        params=SamplingParams(max_tokens=4, seed=1))))
    return _rss()


def measure_shared_memory(path: Path, *, n_ctx: int, n_batch: int = N_BATCH.default, n_threads: int | None = None,
                          n_gpu_layers: int = 0, kv_cache_type: str = KV_CACHE_TYPE.default, repack: str = "auto",
                          mmap: bool = False) -> dict[str, Any]:
    """Resident memory of fresh processes holding 0 (libraries only), 1 and 2 members on one file."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    readings: dict[str, dict[str, float]] = {}
    for k in (0, 1, 2):
        args = {"path": str(path), "members": k, "n_ctx": n_ctx, "n_batch": n_batch,
                "n_threads": n_threads, "n_gpu_layers": n_gpu_layers, "kv_cache_type": kv_cache_type,
                "repack": repack, "mmap": mmap}
        proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                              env=env, timeout=600, check=False)
        if proc.returncode != 0:
            log.warning("memory probe with %d members failed: %s", k, proc.stderr.strip()[-500:])
            return {"error": f"the memory probe failed (exit {proc.returncode}); see the log"}
        readings[str(k)] = json.loads(proc.stdout.strip().splitlines()[-1])
    r0, r1, r2 = (readings[k].get("VmRSS", 0.0) for k in ("0", "1", "2"))
    return {
        "model": path.name,
        "n_ctx": n_ctx,
        "kv_cache_type": kv_cache_type,
        "mmap": mmap,
        "measured": "VmRSS of fresh processes after a short generation (MiB); 0 = interpreter and libraries",
        "rss_mib": {k: round(v.get("VmRSS", 0.0), 1) for k, v in readings.items()},
        "file_backed_mib": {k: round(v.get("RssFile", 0.0), 1) for k, v in readings.items()},
        "anon_mib": {k: round(v.get("RssAnon", 0.0), 1) for k, v in readings.items()},
        "ratio_2_to_1": ratio(r2, r1),
        "ratio_2_to_1_without_libraries": ratio(r2 - r0, r1 - r0),
        "per_extra_member_mib": round(r2 - r1, 1),
    }

