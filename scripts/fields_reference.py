"""docs/server.md's tables of request fields, rendered from src/me_local/server/fields.py.

    python scripts/fields_reference.py          # print them
    python scripts/fields_reference.py --write  # replace them in docs/server.md

tests/test_server_fields.py fails when docs/server.md's copy differs from what this renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

from me_local.server.fields import render_docs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "server.md"
BEGIN = "<!-- request fields: rendered by scripts/fields_reference.py from src/me_local/server/fields.py -->"
END = "<!-- end of the request fields -->"


def write() -> None:
    text = DOCS.read_text(encoding="utf-8")
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        sys.exit(f"{DOCS} has no {BEGIN!r} ... {END!r} markers")
    DOCS.write_text(f"{head}{BEGIN}\n{render_docs().strip()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(render_docs())
