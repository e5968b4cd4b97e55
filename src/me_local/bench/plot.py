"""bench.png: the bench's result as a chart, where matplotlib is installed (``me-local[plot]``).

Two panels share the cases' labels: generation tokens/s and time to first
token, bars at the median and whiskers at the first and third quartiles,
coloured by mode. Without matplotlib nothing is drawn and the command says how
to install it (:data:`PLOT_HINT`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .plan import BASELINE

PLOT_HINT = "pip install 'me-local[plot]'"


def write_chart(result: Mapping[str, Any], path: Path) -> bool:
    """bench.png: tokens/s and TTFT per case, bars at the median, whiskers at q1..q3.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = [c for c in result["cases"].values() if "tokens_per_s" in c and c.get("kind") != "eval"]
    labels = [c["label"] for c in cases]
    colours = {"single": "#4c72b0", "ce": "#dd8452", "me": "#55a868", BASELINE: "#8c8c8c"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(cases) + 1.8), sharey=True)
    for ax, metric, title in ((axes[0], "tokens_per_s", "generation tokens/s (higher is better)"),
                              (axes[1], "ttft_ms", "time to first token, ms (lower is better)")):
        med = [c[metric]["median"] for c in cases]
        err = [[m - c[metric]["q1"] for m, c in zip(med, cases)], [c[metric]["q3"] - m for m, c in zip(med, cases)]]
        ax.barh(range(len(cases)), med, xerr=err, color=[colours.get(c["mode"], "#999999") for c in cases],
                capsize=3)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(cases)), labels)
    axes[0].invert_yaxis()
    m, s = result["machine"], result["settings"]
    fig.suptitle(f"me-local bench: {', '.join(result.get('models', {}))}, {m['cores']} cores, {m['date']} "
                 f"(prompt ~{s['prompt_tokens']} tokens, {s['tokens']} generated, median and IQR of "
                 f"{s['repeats']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

