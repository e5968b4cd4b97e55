"""Word-level ME: the mixture-model-like ensemble over members with different vocabularies.

The shared state is the generated text (bytes); each member keeps its own tokens of it.
At a word boundary one member is drawn by weight; it samples tokens until it samples one
that begins a new word (its piece starts with whitespace, and it is not the word's first
token) or ends the text. The word is the text before that token. If the next draw picks
the same member, it keeps that token as the first token of its next word; another member
drops it (it was never evaluated) and samples its own first token, restricted to tokens
that may begin a word (whitespace-initial or end-of-generation) and renormalised: a word
that did not begin with whitespace would have continued the previous one. The kept token
of a redrawn member is exactly such a restricted sample, so keeping it is exact, and the
text is distributed as the word-level mixture

    P(next word = w | text) = Σ_k λ_k P_k(w | text, a word starts here)

where P_k(w | ·) is the probability that member k writes w and then a word boundary
(docs/word-level.md has the derivation and the boundary cases).

Catch-up is lazy and batched as in token-level ME: a member tokenizes and evaluates the
text it missed only when it is drawn, in one call. It re-tokenizes from the start of the
last word it holds (where pre-tokenizers split, so its tokens of text it did not write are
the ones it would have made itself) and keeps the longest common prefix with its cache:
where a tokenizer merges across the boundary, or the member had sampled a non-canonical
tokenization of its own word, the difference is evaluated again, correctness first.

Text without whitespace (CJK, long identifiers) gets a forced boundary after
:data:`WORD_MAX_BYTES` bytes (at a complete UTF-8 character), so the members keep mixing;
the next member's first token is then unrestricted. That is an approximation: the text
there is not where the members' pre-tokenizers split.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from . import sampling
from .draw import GenerationSetup, common_prefix, draw_member
from .grammar import GrammarTrack
from .text import TextAssembler
from .types import Cancelled, DoneEvent, Event, Member, NoTokenAllowed, SamplingParams, TokenEvent, TokenSampler

log = logging.getLogger("me_local.core")

WORD_MAX_BYTES = 32
"""A word longer than this (bytes, without a whitespace boundary) is cut at the next
complete UTF-8 character: a forced boundary, so members keep mixing in CJK text and long
identifiers."""


@runtime_checkable
class WordMember(Member, Protocol):
    """A member that can take part in word-level ME: the core :class:`Member` plus its
    tokenizer for continuation text and which of its tokens may begin a word."""

    @property
    def word_start(self) -> npt.NDArray[np.bool_]:
        """Per token id: whether it may begin a word at a boundary: its text starts with
        whitespace, or it ends the generation."""
        ...

    def tokenize_text(self, text: str) -> list[int]:
        """Tokens of generated ``text`` as a continuation: no BOS, no space prefix,
        markup not parsed as control tokens."""
        ...

    def make_word_start_sampler(self, params: SamplingParams, seed: int) -> TokenSampler:
        """A sampler like :meth:`Member.make_sampler` restricted to :attr:`word_start`
        tokens (renormalised before the transforms)."""
        ...


class _Track:
    """One member's view of the generated text: its tokens of ``gen[:synced]`` and where
    each ends (byte offsets), plus the boundary token it sampled and may keep."""

    __slots__ = ("ends", "kept", "synced", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ends: list[int] = []
        self.synced = 0
        self.kept: tuple[int, float | None, list[tuple[int, float]] | None] | None = None

    def push(self, token: int, end: int) -> None:
        self.tokens.append(token)
        self.ends.append(end)
        self.synced = end

    def cut(self, offset: int) -> None:
        """Forget the tokens after the one that ends at ``offset`` (a token boundary; 0: all)."""
        n = 0 if offset == 0 else self.ends.index(offset) + 1
        del self.tokens[n:]
        del self.ends[n:]
        self.synced = offset


def generate_words(
    setup: GenerationSetup,
    members: Sequence[WordMember],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    cancel: Callable[[], bool],
    grammar: GrammarTrack | None = None,
) -> Iterator[Event]:
    """Word-level ``me`` over ``members`` (any vocabularies); the events as in token mode,
    one TokenEvent per emitted token of the member that wrote it. With ``grammar`` (tracking
    bytes) each member samples under its own constraint, which accepts the text the others
    wrote before it samples, and its own tokens as they are committed: a kept boundary token
    reaches the grammar only when its member is drawn again and writes it."""
    stats = setup.stats
    stats.granularity = "word"
    stats.words = 0
    for ms in stats.members:
        ms.generated_tokens = 0
    tracks = [_Track() for _ in members]
    samplers: dict[tuple[int, bool], TokenSampler] = {}
    counted: dict[tuple[int, bool], list[int]] = {}
    """The tokens each sampler's penalties have counted, in order (its member's tokens of the text)."""
    assembler = TextAssembler(params.stop)
    gen = bytearray()
    starts = [0]
    """Byte offsets where words began, in order (token boundaries of the member that wrote them)."""
    n_out = 0
    first_drawn: int | None = None

    def catch_up(i: int) -> bool:
        """Bring member i's cache to its prompt and its tokens of ``gen``: re-tokenize from
        the start of the last word it holds, keep the longest common prefix with its cache,
        evaluate the rest in one call. False when that would not fit its context."""
        member, track, ms = members[i], tracks[i], stats.members[i]
        end = len(gen)
        if track.synced < end:
            anchor = 0
            for s in reversed(starts):
                if s < track.synced and (s == 0 or _holds(track.ends, s)):
                    anchor = s
                    break
            track.cut(anchor)
            # text that is not valid UTF-8 reaches a tokenizer with U+FFFD in its place (as the
            # output shows it); then only the segment's end is a known offset, not its tokens'
            tokens = member.tokenize_text(bytes(gen[anchor:end]).decode("utf-8", "replace"))
            lengths = [len(member.token_bytes(t)) for t in tokens]
            exact = sum(lengths) == end - anchor
            offset = anchor
            for n, (tok, length) in enumerate(zip(tokens, lengths)):
                offset += length
                track.push(tok, offset if exact or n == len(tokens) - 1 else -1)
            track.synced = end
        prompt = prompts[i]
        want = [*prompt, *track.tokens]
        if len(want) > member.n_ctx:
            return False
        keep = min(common_prefix(member.cached, want), len(want) - 1)
        member.truncate(keep)
        todo = want[len(member.cached):]
        member.evaluate(todo, cancel)
        from_prompt = max(0, len(prompt) - (len(want) - len(todo)))
        ms.prompt_tokens += from_prompt
        ms.catchup_tokens += len(todo) - from_prompt
        return True

    def sampler_of(i: int, restricted: bool) -> TokenSampler:
        sampler = samplers.get((i, restricted))
        if sampler is None:
            seed = setup.member_seeds[i] ^ (0x5EED if restricted else 0)
            sampler = samplers[i, restricted] = (members[i].make_word_start_sampler(params, seed) if restricted
                                                 else members[i].make_sampler(params, seed))
        return sampler

    def sample(i: int, restricted: bool) -> tuple[int, float | None, list[tuple[int, float]] | None]:
        constraint = grammar.ready(i) if grammar is not None else None
        sampler = sampler_of(i, restricted)
        own = tracks[i].tokens
        if params.penalized:
            _show(sampler, counted.setdefault((i, restricted), []), own, params)
        try:
            token = sampler.sample(constraint)
        except NoTokenAllowed:
            assert grammar is not None
            if not restricted:
                raise grammar.no_token(members[i].name) from None
            # no word-start token is allowed here: the word goes on unrestricted, as after a
            # forced boundary (docs/grammar.md)
            log.debug("member %r: the grammar allows none of its word-start tokens here; its first token "
                      "is unrestricted", members[i].name)
            return sample(i, restricted=False)
        if params.penalized:
            counted[i, restricted].append(token)
        if not params.logprobs:
            return token, None, None
        lp = sampling.log_softmax(sampling.shaped_logits(members[i].logits(), own, params))
        tops = sampling.top_logprobs(lp, params.top_logprobs) if params.top_logprobs else None
        return token, float(lp[token]), tops

    finish = "length"
    end: TokenEvent | None = None
    forced = False
    last: int | None = None
    try:
        while True:
            if n_out >= params.max_tokens or cancel():
                finish = "length" if n_out >= params.max_tokens else "cancelled"
                break
            k = draw_member(setup)
            member, track, ms = members[k], tracks[k], stats.members[k]
            kept = tracks[last].kept if last is not None else None
            if last is not None:
                tracks[last].kept = None
            if last != k or kept is None:  # another member: the kept token is dropped, never evaluated
                if not catch_up(k):
                    break
                kept = sample(k, restricted=bool(gen) and not forced)
            token, logprob, tops = kept
            last = k
            ms.selected += 1
            stats.words += 1
            if first_drawn is None:
                first_drawn = k
                stats.ttft_s = setup.clock() - setup.t0
                stats.prompt_eval_s = stats.ttft_s
            forced = False
            word_start = len(gen)
            if word_start:
                starts.append(word_start)
            while True:  # the word: token by token until one begins the next word
                if member.is_eog(token):
                    finish = "stop"
                    pieces = [member.token_bytes(t) for t, _ in tops] if tops is not None else None
                    end = TokenEvent(n_out, token, "", member.name, logprob, tops, b"", pieces)
                    break
                piece = member.token_bytes(token)
                gen.extend(piece)
                track.push(token, len(gen))
                if grammar is not None:
                    grammar.wrote(k, token, piece)
                ms.generated_tokens = (ms.generated_tokens or 0) + 1
                n_out += 1
                stats.generated_tokens = n_out
                text = assembler.feed(piece)
                pieces = [member.token_bytes(t) for t, _ in tops] if tops is not None else None
                if text or not assembler.stopped:
                    yield TokenEvent(n_out - 1, token, text, member.name, logprob, tops, piece, pieces)
                if assembler.stopped:
                    finish = "stop"
                    break
                if grammar is not None and grammar.on and grammar.only_end(k):  # nothing may follow but the end
                    finish = "stop"
                    break
                if n_out >= params.max_tokens or cancel():
                    finish = "length" if n_out >= params.max_tokens else "cancelled"
                    break
                if len(gen) - word_start >= WORD_MAX_BYTES and _complete_utf8(gen):
                    forced = True
                    break
                if len(prompts[k]) + len(track.tokens) > member.n_ctx:
                    finish = "length"
                    break
                member.evaluate([token], cancel)  # its own last token: the cache lags by one
                token, logprob, tops = sample(k, restricted=False)
                if member.word_start[token]:  # a new word, or the end: the next draw decides
                    track.kept = (token, logprob, tops)
                    break
            if track.kept is None and not forced:  # the text ended (end of generation, stop, limit)
                break
    except Cancelled:
        finish = "cancelled"
    if first_drawn is not None:
        stats.cached_prompt_tokens = stats.members[first_drawn].cached_prompt_tokens
    stats.total_s = setup.clock() - setup.t0
    yield DoneEvent(finish, stats, assembler.flush() if finish != "cancelled" else "", end,
                    grammar.state() if grammar is not None else None)


def _show(sampler: TokenSampler, counted: list[int], tokens: list[int], params: SamplingParams) -> None:
    """Bring what ``sampler``'s penalties count (``counted``) to ``tokens``, its member's tokens of
    the text: observe the new ones; when a token it counted is not the text's any more (a boundary
    token it sampled was dropped, or the text was tokenized again), forget and observe the window."""
    n = len(counted)
    if n <= len(tokens) and tokens[:n] == counted:
        new = tokens[n:]
        if params.repeat_last_n > 0:
            new = new[-params.repeat_last_n:]
        if new:
            sampler.observe(new)
    else:
        sampler.forget()
        window = list(params.penalty_window(tokens))
        if window:
            sampler.observe(window)
    counted[:] = tokens


def _holds(ends: list[int], offset: int) -> bool:
    """Whether one of the token ends (ascending, but for -1: unknown) is ``offset``."""
    i = bisect_left(ends, offset)
    if i < len(ends) and ends[i] == offset:
        return True
    return offset in ends  # the unknown ends break the order: look at them all


def _complete_utf8(data: bytearray) -> bool:
    """Whether ``data`` does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return back == 1
        if b >= 0xC0:  # a lead byte: complete when its sequence is all there
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return back == need
    return True
