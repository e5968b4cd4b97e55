"""Human-readable figures for a generation (used by generate --stats and chat /stats)."""

from __future__ import annotations

from typing import Any


def format_stats(stats: Any, finish_reason: str | None = None) -> str:
    ttft = f"{stats.ttft_s * 1000:.0f} ms" if stats.ttft_s is not None else "-"
    lines = [
        f"mode {stats.mode}  seed {stats.seed}"
        + (f"  granularity word ({stats.words} words)" if getattr(stats, "granularity", None) == "word" else "")
        + (f"  finish {finish_reason}" if finish_reason else ""),
        f"prompt {stats.prompt_tokens} tokens ({stats.cached_prompt_tokens} cached)  "
        f"generated {stats.generated_tokens} tokens  time to first token {ttft}  "
        f"{stats.tokens_per_s:.1f} tokens/s",
    ]
    total = sum(m.selected for m in stats.members) or 1
    for m in stats.members:
        wrote = f"  wrote {m.generated_tokens:>5} tokens" if getattr(m, "generated_tokens", None) is not None else ""
        lines.append(
            f"  {m.name:<14} selected {m.selected:>5} ({100 * m.selected / total:5.1f}%){wrote}  "
            f"catch-up {m.catchup_tokens:>5}  prompt evaluated {m.prompt_tokens:>5}  cached {m.cached_prompt_tokens}"
        )
    return "\n".join(lines)
