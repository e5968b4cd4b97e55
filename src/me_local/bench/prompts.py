"""The text the bench and the load run generate from.

One plain English story (prose keeps end-of-text rare, so runs reach their token
count), numbered per run so that no run reuses another's cached prompt beyond its
first few tokens: :class:`PromptMaker` cuts it to a token count with the model's
own tokenizer (in-process runs); :func:`prompt_text` to a word count (the load
run, which has no tokenizer at hand).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def prompt_text(index: int, prompt_tokens: int, run: str = "") -> str:
    """About ``prompt_tokens`` tokens of English (three words make about four tokens),
    numbered (request and run) so that no request reuses another's cached prompt, in this
    load run or an earlier one."""
    words = STORY.split()
    n = max(1, prompt_tokens * 3 // 4)
    while len(words) < n:
        words = words + STORY.split()
    return f"Request {index}. Run {run}. Continue this story:\n" + " ".join(words[:n])
