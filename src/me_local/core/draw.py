"""What every granularity of the decoding loop shares: checking that the prompts fit,
seeding, the statistics, trimming each member's cache to its cached prompt prefix, and
drawing a member by weight."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ContextOverflowError, RequestError
from .types import MODES, GenerationStats, Member, MemberStats, SamplingParams


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_fits(prompts: Sequence[Sequence[int]], members: Sequence[Member],
               n_ctx: Sequence[int] | None = None) -> None:
    """Each prompt is non-empty and leaves room for a token in its member's context (``n_ctx[i]``
    when given: the request's, at most the member's own)."""
    for i, (prompt, member) in enumerate(zip(prompts, members)):
        limit = member.n_ctx if n_ctx is None else n_ctx[i]
        if not prompt:
            raise RequestError("the prompt is empty; give some text to continue", param="prompt")
        if len(prompt) >= limit:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but member {member.name!r} has a context of "
                f"{limit} tokens; shorten the prompt or raise n_ctx in models.yaml"
            )


@dataclass
class GenerationSetup:
    """A generation's validated weights, active members, random streams and statistics."""

    weights: npt.NDArray[np.float64]
    cum_weights: npt.NDArray[np.float64]
    active: list[int]
    rng: np.random.Generator
    """Draws members (and ``ce`` mode's tokens)."""
    member_seeds: list[int]
    """One seed per member for its own sampler."""
    stats: GenerationStats
    clock: Callable[[], float]
    t0: float
    n_ctx: list[int]
    """Each member's context for this generation: its own, or less when the request asks for less."""


def prepare(
    members: Sequence[Member],
    weights: Sequence[float],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    mode: str,
    single: int,
    clock: Callable[[], float] = time.perf_counter,
    n_ctx: Sequence[int] | None = None,
) -> GenerationSetup:
    """Validate a generation, seed it, and trim each active member's cache to the prefix it
    shares with its prompt (keeping at least one prompt token to evaluate, so its logits will
    exist). Nothing is evaluated here. ``n_ctx[i]`` limits member i's context for this
    generation (never beyond the member's own ``n_ctx``)."""
    if mode not in MODES:
        raise RequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", param="mode")
    if len(members) != len(prompts) or len(members) != len(weights):
        raise ValueError("members, weights and prompts must have the same length")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise RequestError("weights must be >= 0 with at least one positive", param="weights")
    if mode == "single" and not 0 <= single < len(members):
        raise RequestError("no such member for single mode", param="member")
    active = [single] if mode == "single" else [i for i in range(len(members)) if w[i] > 0]
    if n_ctx is not None and len(n_ctx) != len(members):
        raise ValueError("n_ctx must give one context size per member")
    limits = [m.n_ctx if n_ctx is None else min(m.n_ctx, n_ctx[i]) for i, m in enumerate(members)]
    check_fits([prompts[i] for i in active], [members[i] for i in active], [limits[i] for i in active])

    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    seeds = np.random.SeedSequence(seed).spawn(len(members) + 1)
    stats = GenerationStats(
        mode=mode,
        seed=seed,
        prompt_tokens=max(len(prompts[i]) for i in active),
        members=[MemberStats(name=m.name) for m in members],
    )
    setup = GenerationSetup(
        weights=w,
        cum_weights=np.cumsum(w / w.sum()),
        active=active,
        rng=np.random.default_rng(seeds[0]),
        member_seeds=[int(s.generate_state(1)[0] & 0x7FFFFFFF) for s in seeds[1:]],
        stats=stats,
        clock=clock,
        t0=clock(),
        n_ctx=limits,
    )
    for i in active:
        keep = min(common_prefix(members[i].cached, prompts[i]), len(prompts[i]) - 1)
        members[i].truncate(keep)
        stats.members[i].cached_prompt_tokens = len(members[i].cached)
    return setup


def draw_member(setup: GenerationSetup) -> int:
    """Member k with probability λ_k (never one of weight 0)."""
    w = setup.weights
    k = int(np.searchsorted(setup.cum_weights, setup.rng.random(), side="right"))
    k = min(k, len(w) - 1)
    while w[k] <= 0:  # float edge at the top of the cumulative sum
        k -= 1
    return k
