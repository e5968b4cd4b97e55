"""The decoding loop: ``me`` (mixture-model-like ensemble), ``ce``
(conventional ensemble) and ``single``.

The pending-token ledger is implicit and exact: member i's full sequence is
``prompts[i] + generated``; what its cache holds is ``member.cached``; what it
still owes is the difference. In ``me`` mode a member evaluates its debt in one
batched call only when it is drawn, so a member that is never drawn again never
evaluates the tail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..errors import RequestError
from . import sampling
from .draw import GenerationSetup, check_fits, common_prefix, draw_member, prepare
from .grammar import GrammarTrack
from .text import TextAssembler
from .types import (
    GRANULARITIES,
    Cancelled,
    DoneEvent,
    Event,
    GrammarSpec,
    Logits,
    Member,
    NoTokenAllowed,
    Probs,
    SamplingParams,
    TokenEvent,
    TokenSampler,
)
from .words import WordMember, generate_words

__all__ = ["Event", "check_fits", "common_prefix", "generate"]


def _never() -> bool:
    return False


def _pieces(member: Member, tops: list[tuple[int, float]] | None) -> list[bytes] | None:
    return [member.token_bytes(t) for t, _ in tops] if tops is not None else None


def generate(
    members: Sequence[Member],
    weights: Sequence[float],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    mode: str = "me",
    single: int = 0,
    granularity: str = "token",
    cancel: Callable[[], bool] = _never,
    clock: Callable[[], float] = time.perf_counter,
    grammar: GrammarSpec | None = None,
) -> Iterator[Event]:
    """Generate from an ensemble, yielding a TokenEvent per token and one DoneEvent.

    ``prompts[i]`` is member i's prompt tokens (members may have their own
    system prompts and templates). ``weights`` need not be normalised. At ``token``
    granularity every member must have the same vocabulary; ``word`` granularity
    (``me`` mode only, :mod:`.words`) takes any members that are :class:`WordMember`.
    In ``single`` mode only ``members[single]`` runs. ``grammar`` constrains the output
    (docs/grammar.md); the done event then says whether it is complete.
    """
    if granularity not in GRANULARITIES:
        raise RequestError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}",
                           param="granularity")
    if granularity == "word" and mode == "ce":
        raise RequestError("mode ce needs members that share a vocabulary: it mixes their next-token "
                           "distributions; use mode me, which mixes words, at granularity word", param="granularity")
    setup = prepare(members, weights, prompts, params, mode=mode, single=single, clock=clock)
    words = granularity == "word" and mode == "me"
    word_members = [m for m in members if isinstance(m, WordMember)]
    if words and len(word_members) != len(members):
        raise RequestError("granularity word needs members that tokenize text word by word; "
                           "these cannot", param="granularity")
    track = None
    if grammar is not None and grammar.gbnf.strip():
        # ce mixes one distribution over the shared vocabulary: one constraint masks it
        track = GrammarTrack(grammar, members, setup.active[:1] if mode == "ce" else setup.active, by_bytes=words)
    try:
        if words:
            yield from generate_words(setup, word_members, prompts, params, cancel=cancel, grammar=track)
        else:
            yield from _generate_tokens(setup, members, prompts, params, mode=mode, single=single, cancel=cancel,
                                        grammar=track)
    finally:
        if track is not None:
            track.close()


def _generate_tokens(
    setup: GenerationSetup,
    members: Sequence[Member],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    mode: str,
    single: int,
    cancel: Callable[[], bool],
    grammar: GrammarTrack | None = None,
) -> Iterator[Event]:
    active, rng, stats, w = setup.active, setup.rng, setup.stats, setup.weights
    member_seeds, clock, t0 = setup.member_seeds, setup.clock, setup.t0
    generated: list[int] = []
    samplers: dict[int, TokenSampler] = {}
    seen: dict[int, int] = {}
    """How many of the generated tokens each member's sampler has counted (penalties)."""
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
            lp = sampling.log_softmax(sampling.shaped_logits(logits_row, generated, params))
        tops = sampling.top_logprobs(lp, params.top_logprobs) if params.top_logprobs else None
        return float(lp[token]), tops

    finish = "length"
    end: TokenEvent | None = None
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
                k = active[0]
                constraint = grammar.ready(k) if grammar is not None else None
                if constraint is None:
                    probs, mix = sampling.ce_distribution(rows, [w[i] for i in active], params,
                                                          want_raw=params.logprobs, history=generated)
                    token = sampling.draw(probs, rng)
                else:
                    assert grammar is not None
                    tempered, mix = sampling.ce_mixture(rows, [w[i] for i in active], params,
                                                        want_raw=params.logprobs, history=generated)
                    try:
                        token = sampling.constrained_draw(tempered, params, constraint, rng)
                    except NoTokenAllowed:
                        raise grammar.no_token("ce") from None
                name = None
                logprob, tops = logprob_info(None, mix, token)
            else:
                k = single if mode == "single" else draw_member(setup)
                catch_up(k)
                stats.members[k].selected += 1
                sampler = samplers.get(k)
                if sampler is None:
                    sampler = samplers[k] = members[k].make_sampler(params, member_seeds[k])
                if params.penalized:  # the tokens the others wrote since k last sampled: the penalties count them
                    start = seen.get(k, 0)
                    if params.repeat_last_n > 0:
                        start = max(start, len(generated) - params.repeat_last_n)
                    if start < len(generated):
                        sampler.observe(generated[start:])
                constraint = grammar.ready(k) if grammar is not None else None
                try:
                    token = sampler.sample(constraint)
                except NoTokenAllowed:
                    assert grammar is not None
                    raise grammar.no_token(members[k].name) from None
                name = members[k].name
                logprob, tops = logprob_info(members[k].logits() if params.logprobs else None, None, token)
            if first_drawn is None:
                first_drawn = k
                stats.ttft_s = clock() - t0
                stats.prompt_eval_s = stats.ttft_s
            if members[k].is_eog(token):
                finish = "stop"
                end = TokenEvent(len(generated), token, "", name, logprob, tops, b"", _pieces(members[k], tops))
                break
            generated.append(token)
            seen[k] = len(generated)  # its sampler counted the token it drew
            piece = members[k].token_bytes(token)
            if grammar is not None:
                grammar.wrote(k, token, piece)
            text = assembler.feed(piece)
            stats.generated_tokens = len(generated)
            if assembler.stopped:
                if text:
                    yield TokenEvent(len(generated) - 1, token, text, name, logprob, tops, piece,
                                     _pieces(members[k], tops))
                finish = "stop"
                break
            yield TokenEvent(len(generated) - 1, token, text, name, logprob, tops, piece, _pieces(members[k], tops))
            if grammar is not None and grammar.on and grammar.only_end(k):  # nothing may follow but the end
                finish = "stop"
                break
    except Cancelled:
        finish = "cancelled"
    if first_drawn is not None:
        stats.cached_prompt_tokens = stats.members[first_drawn].cached_prompt_tokens
    stats.total_s = clock() - t0
    yield DoneEvent(finish, stats, assembler.flush() if finish != "cancelled" else "", end,
                    grammar.state() if grammar is not None else None)
