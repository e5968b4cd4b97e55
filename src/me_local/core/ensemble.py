"""The decoding loop: ``me`` (mixture-model-like ensemble), ``ce``
(conventional ensemble) and ``single``.

The pending-token ledger is implicit and exact: member i's full sequence is
``prompts[i] + generated``; what its cache holds is ``member.cached``; what it
still owes is the difference. In ``me`` mode a member evaluates its debt in one
batched call only when it is drawn, so a member that is never drawn again never
evaluates the tail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..errors import ContextOverflowError, RequestError
from . import sampling
from .text import TextAssembler
from .types import (
    MODES,
    Cancelled,
    DoneEvent,
    GenerationStats,
    Logits,
    Member,
    MemberStats,
    Probs,
    SamplingParams,
    TokenEvent,
    TokenSampler,
)

Event = TokenEvent | DoneEvent


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _never() -> bool:
    return False


def check_fits(prompts: Sequence[Sequence[int]], members: Sequence[Member]) -> None:
    for prompt, member in zip(prompts, members):
        if not prompt:
            raise RequestError("the prompt is empty; give some text to continue", param="prompt")
        if len(prompt) >= member.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but member {member.name!r} has a context of "
                f"{member.n_ctx} tokens; shorten the prompt or raise n_ctx in models.yaml"
            )


def generate(
    members: Sequence[Member],
    weights: Sequence[float],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    mode: str = "me",
    single: int = 0,
    cancel: Callable[[], bool] = _never,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[Event]:
    """Generate from an ensemble, yielding a TokenEvent per token and one DoneEvent.

    ``prompts[i]`` is member i's prompt tokens (members may have their own
    system prompts). ``weights`` need not be normalised. Every member must have
    the same vocabulary. In ``single`` mode only ``members[single]`` runs.
    """
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
    check_fits([prompts[i] for i in active], [members[i] for i in active])

    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    seeds = np.random.SeedSequence(seed).spawn(len(members) + 1)
    rng = np.random.default_rng(seeds[0])
    member_seeds = [int(s.generate_state(1)[0] & 0x7FFFFFFF) for s in seeds[1:]]
    cum_w = np.cumsum(w / w.sum())

    stats = GenerationStats(
        mode=mode,
        seed=seed,
        prompt_tokens=max(len(prompts[i]) for i in active),
        members=[MemberStats(name=m.name) for m in members],
    )
    t0 = clock()
    # Reuse each member's cached prefix; keep at least one prompt token to evaluate
    # so its logits exist. The cache is only trimmed here, never evaluated.
    for i in active:
        keep = common_prefix(members[i].cached, prompts[i])
        keep = min(keep, len(prompts[i]) - 1)
        members[i].truncate(keep)
        stats.members[i].cached_prompt_tokens = len(members[i].cached)

    generated: list[int] = []
    samplers: dict[int, TokenSampler] = {}
    assembler = TextAssembler(params.stop)
    first_drawn: int | None = None

    def catch_up(i: int) -> None:
        member = members[i]
        n_prompt = len(prompts[i])
        have = len(member.cached)
        seq_len = n_prompt + len(generated)
        if have >= seq_len:
            return
        if have < n_prompt:
            todo = list(prompts[i][have:]) + generated
        else:
            todo = generated[have - n_prompt :]
        member.evaluate(todo, cancel)
        ms = stats.members[i]
        ms.prompt_tokens += max(0, n_prompt - have)
        ms.catchup_tokens += len(todo) - max(0, n_prompt - have)

    def logprob_info(logits_row: Logits | None, mix: Probs | None,
                     token: int) -> tuple[float | None, list[tuple[int, float]] | None]:
        if not params.logprobs:
            return None, None
        if mix is not None:
            lp = np.log(np.maximum(mix, 1e-300))
        else:
            assert logits_row is not None
            lp = sampling.log_softmax(logits_row)
        tops = sampling.top_logprobs(lp, params.top_logprobs) if params.top_logprobs else None
        return float(lp[token]), tops

    finish = "length"
    try:
        while len(generated) < params.max_tokens:
            if cancel():
                finish = "cancelled"
                break
            if max(len(prompts[i]) for i in active) + len(generated) > min(members[i].n_ctx for i in active):
                finish = "length"
                break
            if mode == "ce":
                for i in active:
                    catch_up(i)
                    stats.members[i].selected += 1
                rows = [members[i].logits() for i in active]
                probs, mix = sampling.ce_distribution(rows, [w[i] for i in active], params, want_raw=params.logprobs)
                token = sampling.draw(probs, rng)
                k = active[0]
                name = None
                logprob, tops = logprob_info(None, mix, token)
            else:
                if mode == "single":
                    k = single
                else:
                    k = int(np.searchsorted(cum_w, rng.random(), side="right"))
                    k = min(k, len(members) - 1)
                    while w[k] <= 0:  # float edge at the top of the cumulative sum
                        k -= 1
                catch_up(k)
                stats.members[k].selected += 1
                sampler = samplers.get(k)
                if sampler is None:
                    sampler = samplers[k] = members[k].make_sampler(params, member_seeds[k])
                token = sampler.sample()
                name = members[k].name
                logprob, tops = logprob_info(members[k].logits() if params.logprobs else None, None, token)
            if first_drawn is None:
                first_drawn = k
                stats.ttft_s = clock() - t0
                stats.prompt_eval_s = stats.ttft_s
            if members[k].is_eog(token):
                finish = "stop"
                break
            generated.append(token)
            piece = members[k].token_bytes(token)
            text = assembler.feed(piece)
            stats.generated_tokens = len(generated)
            if assembler.stopped:
                if text:
                    yield TokenEvent(len(generated) - 1, token, text, name, logprob, tops, piece)
                finish = "stop"
                break
            yield TokenEvent(len(generated) - 1, token, text, name, logprob, tops, piece)
    except Cancelled:
        finish = "cancelled"
    if first_drawn is not None:
        stats.cached_prompt_tokens = stats.members[first_drawn].cached_prompt_tokens
    stats.total_s = clock() - t0
    yield DoneEvent(finish, stats, assembler.flush() if finish != "cancelled" else "")
