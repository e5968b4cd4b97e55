"""Chat messages as requests give them, checked and normalised for the members' templates."""

from __future__ import annotations

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
