"""The in-process bench: run the planned cases, interleaved, and summarise them.

:class:`BenchRunner` loads the ensembles, warms every case up, then runs the
interleaved schedule; each run is a cold generation on a new prompt (time to
first token) followed by a warm one on the same prompt and seed (tokens/s), or,
for an evaluation case, one scoring of a new prompt text by one member
(:meth:`Engine.score`: batched passes with logits at every position).
The result is a dict (what bench.json holds): the machine, the settings, the
models, a summary per case (:func:`summarize_case`), ratios per ensemble
(:func:`ensemble_report`, :func:`ce_mixture_cost`) and, optionally, the
resident-memory measurement.
"""

from __future__ import annotations

import datetime
import logging
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..config import Config, EnsembleConfig
from ..core.types import DoneEvent, Event
from .memory import measure_shared_memory
from .plan import BASELINE, Case, EnsemblePlan, interleave, plan_cases
from .prompts import PromptMaker
from .stats import Summary, bytes_per_second, median, mixture_speed, paired_ratio, ratio

log = logging.getLogger("me_local.bench")

SPREAD = "iqr"
"""How spread is reported: the interquartile range q1..q3 (min and max are kept too)."""


@dataclass
class BenchSettings:
    tokens: int = 128
    repeats: int = 5
    prompt_tokens: int = 500
    warmup: bool = True
    baseline: bool = True
    memory: bool = True
    seed: int = 1234
    evaluation: bool = True
    """An evaluation (scoring) case per distinct member, beside its generation."""


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    from ..backends.cpu import cpu_flags, flags_that_matter
    from ..backends.llama import available_cpus, default_threads, llama_cpp_version, supports_gpu_offload

    return {
        "cores": available_cpus(),
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


ProgressFn = Callable[[str], None]

EVAL_INDEX = 90000
"""Evaluation cases number their texts from here, apart from the generations' prompts: a text
scored into a member's cache must not be the prompt a later cold generation finds cached."""


def _run_counting_bytes(events: Iterable[Event]) -> tuple[int, int, DoneEvent]:
    """Run a generation to its end: the UTF-8 bytes of the tokens it generated, those of
    its first token, and its done event."""
    n_bytes = first_bytes = 0
    first = True
    for ev in events:
        if isinstance(ev, DoneEvent):
            return n_bytes, first_bytes, ev
        n_bytes += len(ev.piece)
        if first:
            first_bytes, first = len(ev.piece), False
    raise RuntimeError("generation ended without a done event")


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
        self.cases, self.plans = plan_cases(config, ensembles, baseline=settings.baseline,
                                            evaluation=settings.evaluation)
        self._engine_factory = engine_factory
        self._baselines: dict[str, Any] = {}
        self._prompts: dict[str, PromptMaker] = {}
        self._run_index = 0
        self._eval_index = EVAL_INDEX

    @property
    def total_steps(self) -> int:
        return len(self.cases) * (self.settings.repeats + (1 if self.settings.warmup else 0))

    def run(self, progress: ProgressFn | None = None) -> dict[str, Any]:
        from ..engine import Engine

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
        """Prompts of at most --prompt-tokens tokens for every member: members with different
        vocabularies tokenize one text into different counts, so the longest one counts."""
        maker = self._prompts.get(ensemble)
        if maker is None:
            members = engine.ensemble(ensemble).members

            def longest(text: str) -> list[int]:
                return max((m.raw_prompt(text) for m in members), key=len)

            maker = self._prompts[ensemble] = PromptMaker(longest, self.settings.prompt_tokens)
        return maker

    def _baseline(self, case: Case) -> Any:
        from ..backends.llama import BaselineCompletion, ContextSettings, LoadSettings

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
        from ..engine import Request, sampling_params

        ens = self.config.get(case.ensemble)
        maker = self._prompt(engine, case.ensemble)
        params = sampling_params(ens.sampling, max_tokens=n_tokens, seed=seed)
        if case.kind == "baseline":
            # the prompt in the baseline's own vocabulary (its member's, which may not be the first's)
            member = next(m for m in engine.ensemble(case.ensemble).members if m.name == case.member)
            timing = self._baseline(case).run(member.raw_prompt(maker.text(index)), n_tokens, params, seed)
            return {
                "tokens_per_s": timing.tokens_per_s,
                "bytes_per_s": timing.bytes_per_s,
                "ttft_s": timing.ttft_s,
                "total_s": timing.total_s,
                "generated_tokens": timing.generated_tokens,
                "generated_bytes": timing.generated_bytes,
                "prompt_tokens": timing.prompt_tokens,
                "finish_reason": timing.finish_reason,
            }
        request = Request(
            ensemble=case.ensemble,
            prompt=maker.text(index),
            params=params,
            mode=case.mode,
            member=case.member if case.mode == "single" else None,
            granularity=case.granularity,
        )
        n_bytes, first_bytes, done = _run_counting_bytes(engine.generate(request))
        s = done.stats
        ttft = s.ttft_s if s.ttft_s is not None else s.total_s
        record: dict[str, Any] = {
            "tokens_per_s": s.tokens_per_s,
            "bytes_per_s": bytes_per_second(n_bytes, first_bytes, s.total_s - ttft),
            "ttft_s": ttft,
            "total_s": s.total_s,
            "generated_tokens": s.generated_tokens,
            "generated_bytes": n_bytes,
            "prompt_tokens": s.prompt_tokens,
            "finish_reason": done.finish_reason,
            "members": [
                {"name": m.name, "selected": m.selected, "catchup_tokens": m.catchup_tokens,
                 "prompt_tokens": m.prompt_tokens}
                | ({"generated_tokens": m.generated_tokens} if m.generated_tokens is not None else {})
                for m in s.members
            ],
        }
        if s.granularity is not None:
            record["granularity"] = s.granularity
        if s.words is not None:
            record["words"] = s.words
        return record

    def _score(self, engine: Any, case: Case, index: int) -> dict[str, Any]:
        """One timed evaluation: prompt text number ``index`` (the text generations start from,
        about --prompt-tokens tokens) scored by the case's member alone at token granularity
        after its BOS (an empty context), through :meth:`Engine.score` as ``me-local eval`` scores:
        batched passes with logits at every position, reduced in numpy. tokens/s is the text's
        tokens (the BOS excluded) over the wall time of the whole call (tokenizing, taking a
        slot, the BOS's decode, the passes, the reduction)."""
        import time

        from ..engine import ScoreRequest

        maker = self._prompt(engine, case.ensemble)
        request = ScoreRequest(ensemble=case.ensemble, text=maker.text(index), member=case.member,
                               granularity="token")
        t0 = time.perf_counter()
        tl = engine.score(request)
        wall = time.perf_counter() - t0
        n = tl.scores[0].n
        member = next(m for m in engine.ensemble(case.ensemble).members if m.name == case.member)
        record: dict[str, Any] = {
            "tokens_per_s": n / wall if wall > 0 else 0.0,
            "total_s": wall,
            "scored_tokens": n,
            "mean_logprob": float(tl.member_logp()[0]) / n if n else 0.0,
        }
        rows = getattr(member, "score_rows", None)
        if rows is not None:
            record["rows_per_pass"] = int(rows)
        return record

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
        record["cold_bytes_per_s"] = cold["bytes_per_s"]
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
                if case.kind == "eval":  # the full text: llama.cpp's output buffer grows to a pass's rows
                    self._eval_index += 1
                    self._score(engine, case, self._eval_index)
                else:
                    self._run_index += 1
                    self._generate(engine, case, self._run_index, min(8, st.tokens), st.seed)
                step(f"warm-up {case.label}")
        runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in self.cases}
        for repeat, key in interleave([c.key for c in self.cases], st.repeats):
            case = by_key[key]
            if case.kind == "eval":
                self._eval_index += 1
                record = self._score(engine, case, self._eval_index)
            else:
                record = self._run_case(engine, case, st.tokens, st.seed + repeat)
            record["repeat"] = repeat
            runs[key].append(record)
            log.debug("%s repeat %d: %.1f tokens/s", key, repeat, record["tokens_per_s"])
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
                        "prompt and seed (tokens_per_s, bytes_per_s); cold_tokens_per_s includes me's deferred "
                        "prefill",
                "evaluation": "an eval case scores a new prompt text (about prompt_tokens tokens) after the BOS "
                              "with its member alone at token granularity (Engine.score: batched passes with "
                              "logits at every position); tokens_per_s = tokens scored (BOS excluded) / wall time "
                              "of the call",
                "bytes_per_s": "UTF-8 bytes of generated text after the first token over the time from the first "
                               "token to the last (what word-level me is compared in: tokens differ across "
                               "vocabularies)",
            },
            "models": self._models(),
            "cases": {c.key: summarize_case(c, runs[c.key]) for c in self.cases},
            "ensembles": {},
        }
        for plan in self.plans:
            ce_note = None
            if not plan.shared_vocabulary:
                mismatch = engine.ensemble(plan.name).vocabulary.mismatch
                ce_note = (f"not run: mode ce needs members that share a vocabulary ({mismatch}); "
                           "me mixes words across vocabularies")
            report = ensemble_report(plan, result["cases"], self.config.get(plan.name), ce_note)
            if plan.ce in result["cases"]:
                report.update(ce_mixture_cost(engine, self.config.get(plan.name), st.tokens,
                                              result["cases"][plan.ce], result["cases"][plan.me]))
            result["ensembles"][plan.name] = report
        if st.memory:
            result["memory"] = self._memory()
        return result

    def _models(self) -> dict[str, Any]:
        from ..backends.llama import LoadSettings

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
    if case.kind == "eval":  # scoring: tokens/s and time per text, no generation figures
        out["granularity"] = case.granularity
        out["tokens_per_s"] = Summary.of(r["tokens_per_s"] for r in runs).to_dict(3)
        out["total_ms"] = Summary.of(r["total_s"] * 1000.0 for r in runs).to_dict(3)
        out["scored_tokens"] = median([r["scored_tokens"] for r in runs])
        if all("rows_per_pass" in r for r in runs):
            out["rows_per_pass"] = runs[0]["rows_per_pass"]
        return out
    out["tokens_per_s"] = Summary.of(r["tokens_per_s"] for r in runs).to_dict(3)
    if all("bytes_per_s" in r for r in runs):
        out["bytes_per_s"] = Summary.of(r["bytes_per_s"] for r in runs).to_dict(3)
    out["ttft_ms"] = Summary.of(r["ttft_s"] * 1000.0 for r in runs).to_dict(3)
    if all("cold_tokens_per_s" in r for r in runs):
        out["cold_tokens_per_s"] = Summary.of(r["cold_tokens_per_s"] for r in runs).to_dict(3)
    if all("cold_bytes_per_s" in r for r in runs):
        out["cold_bytes_per_s"] = Summary.of(r["cold_bytes_per_s"] for r in runs).to_dict(3)
    out["generated_tokens"] = median([r["generated_tokens"] for r in runs])
    if all("generated_bytes" in r for r in runs):
        out["generated_bytes"] = median([r["generated_bytes"] for r in runs])
    out["prompt_tokens"] = median([r["prompt_tokens"] for r in runs])
    if runs[0].get("granularity"):
        out["granularity"] = runs[0]["granularity"]
    if all("words" in r for r in runs):
        out["words"] = sum(r["words"] for r in runs) / len(runs)
    if runs[0].get("members"):
        n = len(runs)
        members = []
        for i, m in enumerate(runs[0]["members"]):
            summary = {
                "name": m["name"],
                "selected": sum(r["members"][i]["selected"] for r in runs) / n,
                "catchup_tokens": sum(r["members"][i]["catchup_tokens"] for r in runs) / n,
                "prompt_tokens": sum(r["members"][i]["prompt_tokens"] for r in runs) / n,
            }
            if all("generated_tokens" in r["members"][i] for r in runs):
                summary["generated_tokens"] = sum(r["members"][i]["generated_tokens"] for r in runs) / n
            members.append(summary)
        out["members"] = members
    return out


def _by_repeat(case: Mapping[str, Any], metric: str) -> dict[int, float]:
    return {int(r["repeat"]): float(r[metric]) for r in case.get("runs", [])}


def _prompt_speeds(case: Mapping[str, Any]) -> dict[int, float]:
    """Per repeat, a generation case's prompt processing speed: the cold run's prompt tokens
    over its time to first token (logits at the last position only)."""
    return {int(r["repeat"]): r["prompt_tokens"] / r["ttft_s"] for r in case.get("runs", [])
            if r.get("ttft_s") and r.get("prompt_tokens")}


EVAL_TARGET = 5.0
"""Evaluation (scoring with logits at every position) against generation on the same model, tokens/s (issue 11)."""


def evaluation_report(plan: EnsemblePlan, cases: Mapping[str, Any]) -> dict[str, Any]:
    """Per member with an evaluation case: its scoring tokens/s against its ``single``
    generation tokens/s (``eval/generation``, ratio of medians and paired by repeat), and, as
    the bound batching has on this machine, its prompt processing speed against generation
    (``prompt/generation``: the cold runs' prompt tokens over their TTFT)."""
    out: dict[str, Any] = {}
    for member, key in plan.evaluation.items():
        single_key = plan.single[member]
        ev, single = cases.get(key), cases.get(single_key)
        if not ev or "tokens_per_s" not in ev or not single or "tokens_per_s" not in single:
            continue
        ev_s, gen_s = _by_repeat(ev, "tokens_per_s"), _by_repeat(single, "tokens_per_s")
        prompt_s = _prompt_speeds(single)
        gen = float(single["tokens_per_s"]["median"])
        prompt = median(list(prompt_s.values())) if prompt_s else None
        reps = sorted(ev_s)
        out[member] = {
            "case": key,
            "single": single_key,
            "tokens_per_s": float(ev["tokens_per_s"]["median"]),
            "generation_tokens_per_s": gen,
            "prompt_tokens_per_s": prompt,
            "scored_tokens": ev.get("scored_tokens"),
            "rows_per_pass": ev.get("rows_per_pass"),
            "eval/generation": ratio(float(ev["tokens_per_s"]["median"]), gen),
            "paired_eval/generation": paired_ratio([ev_s[r] for r in reps], [gen_s.get(r) for r in reps]),
            "prompt/generation": ratio(prompt, gen),
            "target": EVAL_TARGET,
        }
    return out


def ensemble_report(plan: EnsemblePlan, cases: Mapping[str, Any], ens: EnsembleConfig,
                    ce_note: str | None = None) -> dict[str, Any]:
    """Ratios for one ensemble from the case summaries (ratios of medians, and paired).
    Members with one vocabulary: ``me`` (token by token) against ``ce`` and against its
    members alone in tokens/s, and ``me`` word by word against token by token. Members with
    different vocabularies: word-level ``me`` against each member alone and against their
    weighted harmonic mean in bytes/s (tokens are not comparable), and its time to first
    token against the slower member's; ``ce_note`` says why there is no ``ce``."""

    def med(key: str | None, metric: str) -> float | None:
        if key is None or key not in cases or metric not in cases[key]:
            return None
        return float(cases[key][metric]["median"])

    single_keys = [plan.single[m] for m in plan.members]
    base = {}
    for m in plan.members:
        if m in plan.baseline:
            s = _by_repeat(cases[plan.single[m]], "tokens_per_s")
            b = _by_repeat(cases[plan.baseline[m]], "tokens_per_s")
            base[m] = paired_ratio([s[r] for r in sorted(s)], [b.get(r) for r in sorted(s)])
    single_vs_baseline = {
        m: ratio(med(plan.single[m], "tokens_per_s"), med(plan.baseline.get(m), "tokens_per_s"))
        for m in plan.members
        if m in plan.baseline
    }
    report: dict[str, Any] = {
        "label": plan.label,
        "members": plan.members,
        "weights": [round(w, 6) for w in plan.weights],
        "n_ctx": ens.n_ctx,
        "granularity": "token" if plan.shared_vocabulary else "word",
        "shared_vocabulary": plan.shared_vocabulary,
        "cases": {"me": plan.me, "ce": plan.ce if plan.shared_vocabulary else None, "single": plan.single,
                  "baseline": plan.baseline, "evaluation": plan.evaluation},
    }
    evaluation = evaluation_report(plan, cases)
    report["evaluation"] = evaluation
    eval_ratios = {m: e["eval/generation"] for m, e in evaluation.items()}
    eval_paired = {m: e["paired_eval/generation"] for m, e in evaluation.items()}
    if not plan.shared_vocabulary:
        report["ce"] = ce_note or "not run: mode ce needs members that share a vocabulary"
        report.update(_word_ratios(plan, cases, med, single_keys))
        report["ratios"]["single/" + BASELINE] = single_vs_baseline
        report["paired_ratios"]["single/" + BASELINE] = base
        report["ratios"]["eval/generation"] = eval_ratios
        report["paired_ratios"]["eval/generation"] = eval_paired
        return report

    single_speed = mixture_speed([med(k, "tokens_per_s") or 0.0 for k in single_keys], plan.weights)
    has_ens = plan.me in cases
    has_word = plan.me_word is not None and plan.me_word in cases
    ratios: dict[str, Any] = {
        "me/ce": ratio(med(plan.me, "tokens_per_s"), med(plan.ce, "tokens_per_s")) if has_ens else None,
        "me/single": ratio(med(plan.me, "tokens_per_s"), single_speed) if has_ens else None,
        "ce_ttft/me_ttft": ratio(med(plan.ce, "ttft_ms"), med(plan.me, "ttft_ms")) if has_ens else None,
        "me/ce_cold_prompt": ratio(med(plan.me, "cold_tokens_per_s"), med(plan.ce, "cold_tokens_per_s"))
        if has_ens else None,
        "me_word/me_token": ratio(med(plan.me_word, "tokens_per_s"), med(plan.me, "tokens_per_s"))
        if has_word and has_ens else None,
        "me_word_ttft/me_token_ttft": ratio(med(plan.me_word, "ttft_ms"), med(plan.me, "ttft_ms"))
        if has_word and has_ens else None,
        "single/" + BASELINE: single_vs_baseline,
        "eval/generation": eval_ratios,
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
        if has_word:
            assert plan.me_word is not None
            word_s = _by_repeat(cases[plan.me_word], "tokens_per_s")
            paired["me_word/me_token"] = paired_ratio([word_s.get(r) for r in reps], [me_s[r] for r in reps])
    paired["single/" + BASELINE] = base
    paired["eval/generation"] = eval_paired
    report["cases"]["me_word"] = plan.me_word
    report["single_mixture_tokens_per_s"] = single_speed
    report["ratios"] = ratios
    report["paired_ratios"] = paired
    return report


def _word_ratios(plan: EnsemblePlan, cases: Mapping[str, Any], med: Callable[[str | None, str], float | None],
                 single_keys: Sequence[str]) -> dict[str, Any]:
    """Word-level ``me`` against its members alone, in bytes/s, and its time to first token
    against the slower member's (see :func:`ensemble_report`)."""
    mix = mixture_speed([med(k, "bytes_per_s") or 0.0 for k in single_keys], plan.weights)
    ttfts = [med(k, "ttft_ms") for k in single_keys]
    slower = max((t for t in ttfts if t is not None), default=None)
    has_me = plan.me in cases
    ratios: dict[str, Any] = {
        "me/ce": None,
        "me/single_mixture_bytes": ratio(med(plan.me, "bytes_per_s"), mix) if has_me else None,
        "me/single_bytes": {m: ratio(med(plan.me, "bytes_per_s"), med(plan.single[m], "bytes_per_s"))
                            for m in plan.members} if has_me else {},
        "me_ttft/slower_single_ttft": ratio(med(plan.me, "ttft_ms"), slower) if has_me else None,
    }
    paired: dict[str, Any] = {}
    if has_me:
        me_b, me_t = _by_repeat(cases[plan.me], "bytes_per_s"), _by_repeat(cases[plan.me], "ttft_s")
        singles_b = [_by_repeat(cases[k], "bytes_per_s") for k in single_keys]
        singles_t = [_by_repeat(cases[k], "ttft_s") for k in single_keys]
        reps = sorted(me_b)
        per_rep_mix = [mixture_speed([s.get(r, 0.0) for s in singles_b], plan.weights) for r in reps]
        paired["me/single_mixture_bytes"] = paired_ratio([me_b[r] for r in reps], per_rep_mix)
        paired["me/single_bytes"] = {m: paired_ratio([me_b[r] for r in reps], [s.get(r) for r in reps])
                                     for m, s in zip(plan.members, singles_b)}
        paired["me_ttft/slower_single_ttft"] = paired_ratio(
            [me_t.get(r) for r in reps], [max((s[r] for s in singles_t if r in s), default=None) for r in reps])
    return {"single_mixture_bytes_per_s": mix, "ratios": ratios, "paired_ratios": paired}


def ce_mixture_cost(engine: Any, ens: EnsembleConfig, n_tokens: int, ce_case: Mapping[str, Any],
                    me_case: Mapping[str, Any], repeats: int = 30) -> dict[str, Any]:
    """How much of a ``ce`` step is its numpy work over the vocabulary (softmax of every
    member, the mixture, truncation, the draw), timed on random logits of the model's
    vocabulary size with the ensemble's default sampling; and me/ce against a ``ce``
    whose mixture cost nothing (decode time alone)."""
    import time

    import numpy as np

    from ..core import sampling
    from ..engine import sampling_params

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

