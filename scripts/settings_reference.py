"""The README's settings reference, rendered from the table in src/me_local/settings.py.

    python scripts/settings_reference.py          # print it
    python scripts/settings_reference.py --write  # replace it in README.md

tests/test_settings.py fails when README.md's copy differs from what this renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

from me_local.settings import SETTINGS, Setting

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- settings reference: rendered by scripts/settings_reference.py from src/me_local/settings.py -->"
END = "<!-- end of the settings reference -->"

_YAML_PLACE = {"sampling": "sampling.{}", "ensemble": "{}", "member": "members[].{}"}


def _code(*names: str | None) -> str:
    return ", ".join(f"`{n}`" for n in names if n)


def _row(s: Setting[object]) -> list[str]:
    yaml = _YAML_PLACE[s.group].format(s.name) if s.yaml else None
    openai = _code(s.openai, *s.openai_also)
    return [
        f"`{s.name}`",
        s.default_shown(),
        s.bounds_text(),
        _code(yaml),
        _code(s.flag, s.short),
        openai,
        _code(s.ollama),
        _code(s.chat),
        s.help,
    ]


def render() -> str:
    """The reference as Markdown, between its BEGIN and END marks."""
    head = ["setting", "default", "values", "models.yaml", "flag", "OpenAI", "Ollama", "chat /set", "meaning"]
    lines = [BEGIN, "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in SETTINGS:
        cells = [c.replace("|", "\\|") for c in _row(s)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def current(text: str) -> str:
    """README.md's copy of the reference, marks included ('' when it has none)."""
    start = text.find(BEGIN)
    end = text.find(END)
    if start < 0 or end < start:
        return ""
    return text[start : end + len(END)] + "\n"


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        text = README.read_text(encoding="utf-8")
        old = current(text)
        if not old:
            print(f"README.md has no {BEGIN!r} ... {END!r} section to replace", file=sys.stderr)
            return 1
        README.write_text(text.replace(old, render()), encoding="utf-8")
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
