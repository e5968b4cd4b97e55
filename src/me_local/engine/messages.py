"""Chat messages as requests give them, checked and normalised for the members' templates."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import RequestError

ROLES = ("system", "user", "assistant", "tool", "developer")


class Messages(list[dict[str, str]]):
    """Chat messages :func:`normalize_messages` has checked: ``{role, content}`` with a known
    role and text content. The servers hand these to the engine, which does not check them again."""


def normalize_messages(messages: object) -> Messages:
    """Validate chat messages; content may be a string or OpenAI-style text parts."""
    if isinstance(messages, Messages):
        return messages
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with `role` and `content`", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", param="messages"
            )
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise RequestError(
                        f"messages[{i}].content: only text parts are supported", param="messages"
                    )
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return Messages(out)


def fit_messages(messages: Messages, render: Callable[[Messages], Sequence[int]], budget: int
                 ) -> tuple[list[int], int]:
    """The prompt ``render`` makes of ``messages``, made to fit ``budget`` tokens by leaving out
    the oldest turns, as Ollama truncates a conversation: system messages and the latest
    message always stay; a turn (a user message and the replies after it) goes whole, the
    oldest first, as few as will do. Returns the prompt and how many messages were left out;
    when even the fewest messages left (the system messages and the latest one) do not fit
    ``budget``, that shortest prompt (the caller checks it against the context)."""
    full = list(render(messages))
    if len(full) <= budget:
        return full, 0
    rest = [j for j, m in enumerate(messages) if m["role"] != "system"]
    # a cut at c leaves out rest[:c]: before a user message, or all but the latest message
    cuts = [c for c in range(1, len(rest)) if messages[rest[c]]["role"] == "user" or c == len(rest) - 1]
    if not cuts:
        return full, 0

    def prompt(k: int) -> list[int]:
        gone = set(rest[:cuts[k]])
        return list(render(Messages(m for j, m in enumerate(messages) if j not in gone)))

    tried: dict[int, list[int]] = {}
    lo, hi, best = 0, len(cuts) - 1, len(cuts) - 1
    while lo <= hi:  # the prompt shortens as more is left out: the fewest cuts that fit
        mid = (lo + hi) // 2
        tried[mid] = prompt(mid)
        if len(tried[mid]) <= budget:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    return (tried[best] if best in tried else prompt(best)), cuts[best]
