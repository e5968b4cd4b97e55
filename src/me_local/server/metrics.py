"""Prometheus metrics, hand-written in the text exposition format (0.0.4).

Counters and histograms are updated on the event loop only (the bridge hands
worker-thread timings over through the loop), so no locks are needed. Gauges
that describe the engine (busy slots, queue depth) are read at scrape time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..core import GenerationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Labels = tuple[tuple[str, str], ...]


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}"


def format_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class Counter:
    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple((n, str(labels[n])) for n in self.labelnames)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple((n, str(labels[n])) for n in self.labelnames), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for key, v in sorted(self.values.items()):
            yield f"{self.name}{format_labels(key)} {format_value(v)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}  # per label set: bucket counts, [sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple((n, str(labels[n])) for n in self.labelnames)
        counts, totals = self.series.setdefault(key, ([0] * len(self.buckets), [0.0, 0.0]))
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                counts[i] += 1
        totals[0] += value
        totals[1] += 1

    def count(self, **labels: str) -> int:
        key = tuple((n, str(labels[n])) for n in self.labelnames)
        return int(self.series[key][1][1]) if key in self.series else 0

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for key, (counts, (total, n)) in sorted(self.series.items()):
            for upper, c in zip(self.buckets, counts):
                yield f"{self.name}_bucket{format_labels((*key, ('le', format_value(upper))))} {c}"
            yield f"{self.name}_bucket{format_labels((*key, ('le', '+Inf')))} {int(n)}"
            yield f"{self.name}_sum{format_labels(key)} {format_value(total)}"
            yield f"{self.name}_count{format_labels(key)} {int(n)}"


def gauge(name: str, help: str, samples: Iterable[tuple[Labels, float]]) -> list[str]:
    lines = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    lines += [f"{name}{format_labels(k)} {format_value(v)}" for k, v in samples]
    return lines


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        self.requests = Counter("me_local_requests_total", "HTTP requests by endpoint, method and status.",
                                ("endpoint", "method", "status"))
        self.generations = Counter("me_local_generations_total", "Generations by ensemble and finish reason.",
                                   ("ensemble", "finish_reason"))
        self.tokens = Counter("me_local_tokens_generated_total", "Tokens generated.", ("ensemble",))
        self.prompt_tokens = Counter("me_local_prompt_tokens_total", "Prompt tokens of generations.", ("ensemble",))
        self.cached_tokens = Counter("me_local_prompt_tokens_cached_total",
                                     "Prompt tokens reused from a slot's cache.", ("ensemble",))
        self.selections = Counter("me_local_member_selections_total",
                                  "Steps at which a member was drawn (ce: every member every step).",
                                  ("ensemble", "member"))
        self.catchup = Counter("me_local_member_catchup_tokens_total",
                               "Generated tokens a member evaluated after missing them.", ("ensemble", "member"))
        self.cancellations = Counter("me_local_cancellations_total", "Generations stopped early, by reason.",
                                     ("ensemble", "reason"))
        self.ttft = Histogram("me_local_time_to_first_token_seconds",
                              "From taking a slot to the first token (prompt processing included).",
                              TTFT_BUCKETS, ("ensemble",))
        self.token_latency = Histogram("me_local_token_latency_seconds", "Time between consecutive tokens.",
                                       TOKEN_BUCKETS, ("ensemble",))

    def record_generation(self, ensemble: str, finish_reason: str, stats: GenerationStats,
                          cancel_reason: str | None) -> None:
        self.generations.inc(ensemble=ensemble, finish_reason=finish_reason)
        self.tokens.inc(stats.generated_tokens, ensemble=ensemble)
        self.prompt_tokens.inc(stats.prompt_tokens, ensemble=ensemble)
        self.cached_tokens.inc(stats.cached_prompt_tokens, ensemble=ensemble)
        for m in stats.members:
            self.selections.inc(m.selected, ensemble=ensemble, member=m.name)
            self.catchup.inc(m.catchup_tokens, ensemble=ensemble, member=m.name)
        if stats.ttft_s is not None:
            self.ttft.observe(stats.ttft_s, ensemble=ensemble)
        if finish_reason == "cancelled":
            self.cancellations.inc(ensemble=ensemble, reason=cancel_reason or "cancelled")

    def render(self, gauges: Sequence[list[str]] = ()) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.generations, self.tokens, self.prompt_tokens, self.cached_tokens,
                       self.selections, self.catchup, self.cancellations, self.ttft, self.token_latency):
            lines.extend(metric.render())
        for g in gauges:
            lines.extend(g)
        return "\n".join(lines) + "\n"
