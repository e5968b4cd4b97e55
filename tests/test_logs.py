"""The daemon's log lines: one per event, journald priorities, secrets and prompts kept out."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from me_local.logs import (
    ACCESS_LOGGER,
    AccessLog,
    AccessRecord,
    LineFormatter,
    format_access,
    setup_logging,
    stream_is_journal,
)

KEY = "sk-secret-0123456789"


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def record(msg: str, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("me_local.server", level, __file__, 1, msg, (), exc_info)


def test_access_line_has_method_path_status_tokens_duration() -> None:
    rec = AccessRecord("post", "/v1/chat/completions?api_key=" + KEY, 200, 1.23456, prompt_tokens=12,
                       completion_tokens=30, model="default", client="127.0.0.1", prompt="my secret plans")
    assert format_access(rec) == "POST /v1/chat/completions 200 tokens=12+30 1.235s model=default client=127.0.0.1"
    assert format_access(AccessRecord("GET", "/health", 503, 0.0004)) == "GET /health 503 tokens=- 0.000s"


def test_prompts_only_with_log_prompts() -> None:
    rec = AccessRecord("POST", "/api/chat", 200, 0.5, 3, 4, prompt='say "hi"\nthen bye')
    assert "say" not in format_access(rec)
    assert format_access(rec, log_prompts=True).endswith(' prompt="say \\"hi\\"\\nthen bye"')
    long = AccessRecord("POST", "/api/chat", 200, 0.5, prompt="x" * 50)
    assert format_access(long, log_prompts=True, max_prompt_chars=10).endswith('prompt="xxxxxxxxxx…(+40 chars)"')


def test_client_strings_cannot_forge_fields_or_lines() -> None:
    rec = AccessRecord("GET", "/v1/models\n200 fake", 404, 0.01, model="a b\r\nc")
    line = format_access(rec)
    assert "\n" not in line and "\r" not in line
    assert line == "GET /v1/models%0A200%20fake 404 tokens=- 0.010s model=a%20b%0D%0Ac"


def test_access_log_writes_info_on_its_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        AccessLog(log_prompts=True).log(AccessRecord("POST", "/v1/completions", 200, 1.0, 1, 2, prompt="hello"))
    [r] = caplog.records
    assert (r.name, r.levelno) == (ACCESS_LOGGER, logging.INFO)
    assert r.getMessage() == 'POST /v1/completions 200 tokens=1+2 1.000s prompt="hello"'


def test_formatter_folds_lines_and_redacts_secrets() -> None:
    fmt = LineFormatter(secrets=[KEY, "", "ab"])
    try:
        raise RuntimeError(f"bad key {KEY}")
    except RuntimeError:
        import sys

        line = fmt.format(record(f"first\nsecond with {KEY}", logging.ERROR, sys.exc_info()))
    assert "\n" not in line and KEY not in line
    assert "first\\nsecond with ***" in line and "RuntimeError: bad key ***" in line
    assert " ERROR me_local.server: " in line
    assert "ab" in fmt.format(record("ab stays"))  # too short to be a secret


def test_journal_lines_carry_priority_and_no_timestamp() -> None:
    fmt = LineFormatter(journal=True)
    assert fmt.format(record("up", logging.INFO)) == "<6>INFO me_local.server: up"
    assert fmt.format(record("hm", logging.WARNING)).startswith("<4>WARNING ")
    assert fmt.format(record("no", logging.ERROR)).startswith("<3>ERROR ")
    assert fmt.format(record("dbg", logging.DEBUG)).startswith("<7>DEBUG ")


def test_journal_detected_from_journal_stream(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as f:
        st = os.fstat(f.fileno())
        assert stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stream_is_journal(f, {})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_setup_logging_replaces_handlers_one_line_per_event(restore_root_logger: None) -> None:
    logging.basicConfig(level=logging.WARNING)  # what the CLI did first
    out = io.StringIO()
    setup_logging("info", stream=out, secrets=[KEY], journal=False)
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("me_local.x").info("line one\nline two, key %s", KEY)
    logging.getLogger("me_local.x").debug("hidden at info")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("INFO me_local.x: line one\\nline two, key ***")
