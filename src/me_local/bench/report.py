"""The bench's output: bench.json, the table on stdout, and the speed targets.

:func:`run_bench` runs a :class:`~me_local.bench.runs.BenchRunner` and writes
bench.json (and bench.png where matplotlib is installed);
:func:`format_report` prints the result as a table of medians and quartiles with
the ratios under it; :func:`evaluate_targets` checks the speed and memory
targets of the engine, bench and evaluation issues that an in-process run can check, and
:func:`format_targets` lists them with PASS or MISS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import BASELINE
from .plot import write_chart
from .runs import BenchRunner, ProgressFn


@dataclass
class Target:
    name: str
    value: float | None
    op: str  # ">=" | "<="
    threshold: float
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "op": self.op, "threshold": self.threshold,
                "passed": self.passed, "note": self.note}


WORD_ME_VS_MIXTURE = 0.85
"""Word-level me's bytes/s against the weighted harmonic mean of its members' (issue 10)."""
WORD_ME_TTFT = 1.1
"""Word-level me's time to first token against the slower member's alone (issue 10)."""


def evaluate_targets(result: Mapping[str, Any]) -> list[Target]:
    """The speed targets of the engine, bench and word-level issues that an in-process run can check."""
    targets: list[Target] = []
    prompt = result.get("settings", {}).get("prompt_tokens", 0)
    seen_baseline: set[tuple[str, str]] = set()
    seen_eval: set[tuple[str, str]] = set()
    for name, ens in result.get("ensembles", {}).items():
        r = ens["ratios"]
        for member, value in r.get("single/" + BASELINE, {}).items():
            pair = (ens["cases"]["single"][member], ens["cases"]["baseline"][member])
            if pair in seen_baseline:
                continue
            seen_baseline.add(pair)
            targets.append(Target(f"single ({member}) vs {BASELINE} create_completion", value, ">=", 0.95))
        n = len(ens["members"])
        if ens.get("granularity") == "word":
            targets.append(Target(f"{name}: word-level me vs the members' harmonic mean, bytes/s",
                                  r.get("me/single_mixture_bytes"), ">=", WORD_ME_VS_MIXTURE))
            targets.append(Target(f"{name}: word-level me TTFT vs the slower member's",
                                  r.get("me_ttft/slower_single_ttft"), "<=", WORD_ME_TTFT))
        if r.get("me/ce") is not None and n in (2, 3):
            targets.append(Target(f"{name}: me vs ce tokens/s, {n} members", r["me/ce"], ">=", 1.35 if n == 2 else 1.5))
        if r.get("me/single") is not None and n == 2:
            targets.append(Target(f"{name}: me vs single tokens/s, 2 members", r["me/single"], ">=", 0.75))
        if r.get("ce_ttft/me_ttft") and n == 2:
            note = "" if prompt >= 500 else f"measured with a {prompt}-token prompt; the target names 500"
            targets.append(Target(f"{name}: me TTFT vs ce TTFT, 2 members", 1.0 / r["ce_ttft/me_ttft"], "<=", 0.6,
                                  note))
    for ens in result.get("ensembles", {}).values():
        for member, e in ens.get("evaluation", {}).items():
            if (e["case"], e["single"]) in seen_eval:
                continue
            seen_eval.add((e["case"], e["single"]))
            bound = e.get("prompt/generation")
            note = f"prompt processing alone: {bound:.2f}x generation" if bound is not None else ""
            targets.append(Target(f"evaluation ({member}) vs its generation, tokens/s", e["eval/generation"], ">=",
                                  e.get("target", 5.0), note))
    mem = result.get("memory") or {}
    if mem.get("ratio_2_to_1") is not None:
        label = f"resident memory, 2 members sharing {mem['model']} vs 1 (n_ctx {mem['n_ctx']}, " \
                f"KV {mem.get('kv_cache_type', 'f16')})"
        targets.append(Target(label,
                              mem["ratio_2_to_1"], "<=", 1.3))
    return targets


def format_targets(targets: Sequence[Target]) -> str:
    lines = []
    for t in targets:
        status = {True: "PASS", False: "MISS", None: "n/a "}[t.passed]
        value = f"{t.value:.2f}x" if t.value is not None else "-"
        line = f"  [{status}] {t.name}: {value} (target {t.op} {t.threshold:g}x)"
        if t.note:
            line += f"  ({t.note})"
        lines.append(line)
    return "\n".join(lines)


def _fmt_ratio(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _fmt_summary(s: Mapping[str, Any] | None, width: int = 8) -> str:
    if not s:
        return f"{'-':>{width}} {'':15}"
    return f"{s['median']:>{width}.1f} [{s['q1']:>6.1f}-{s['q3']:<6.1f}]"


def format_report(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    models = ", ".join(result.get("models", {}))
    lines = [
        f"me-local bench  {m['date']}  {m['cores']} cores ({m['cpu']})  llama-cpp-python {m['llama_cpp_python']}",
        f"model {models}; prompt ~{s['prompt_tokens']} tokens, {s['tokens']} generated, {s['repeats']} repeats "
        f"(interleaved); median [q1-q3]",
        "",
        f"  {'case':<50} {'tokens/s (warm prompt)':>24} {'bytes/s (warm prompt)':>24} {'TTFT ms (cold prompt)':>26} "
        f"{'tokens/s cold':>14}",
    ]
    for case in result["cases"].values():
        if "tokens_per_s" not in case or case.get("kind") == "eval":
            continue
        lines.append(
            f"  {case['label']:<50} {_fmt_summary(case['tokens_per_s'])} {_fmt_summary(case.get('bytes_per_s'))} "
            f"{_fmt_summary(case['ttft_ms'], 9)}"
            + (f" {case['cold_tokens_per_s']['median']:>12.1f}" if "cold_tokens_per_s" in case else "")
        )
    lines.extend(_format_evaluation(result))
    for ens in result["ensembles"].values():
        r, p = ens["ratios"], ens["paired_ratios"]
        lines.append("")
        if ens["cases"]["me"] not in result["cases"]:  # one member: nothing to ensemble
            lines.append(f"  {ens['label']}:")
        elif ens.get("granularity") == "word":
            paired_bytes = p.get("me/single_bytes", {})
            per_member = ", ".join(f"me/{member} {_fmt_ratio(v)} (paired {_fmt_ratio(paired_bytes.get(member))})"
                                   for member, v in r["me/single_bytes"].items())
            lines.append(f"  {ens['label']}, word by word (the members' vocabularies differ), in bytes/s: "
                         f"me/harmonic mean of the members alone {_fmt_ratio(r['me/single_mixture_bytes'])} "
                         f"(paired {_fmt_ratio(p.get('me/single_mixture_bytes'))}); {per_member}")
            lines.append(f"    me TTFT / the slower member's TTFT {_fmt_ratio(r['me_ttft/slower_single_ttft'])} "
                         f"(paired {_fmt_ratio(p.get('me_ttft/slower_single_ttft'))})")
            lines.append(f"    ce: {ens.get('ce')}")
        else:
            lines.append(f"  {ens['label']}: me/ce {_fmt_ratio(r['me/ce'])} (paired {_fmt_ratio(p.get('me/ce'))})  "
                         f"me/single {_fmt_ratio(r['me/single'])} (paired {_fmt_ratio(p.get('me/single'))})  "
                         f"ce-TTFT/me-TTFT {_fmt_ratio(r['ce_ttft/me_ttft'])}  "
                         f"me/ce on a cold prompt {_fmt_ratio(r.get('me/ce_cold_prompt'))}")
            if r.get("me_word/me_token") is not None:
                lines.append(f"    me word by word / token by token, tokens/s {_fmt_ratio(r['me_word/me_token'])} "
                             f"(paired {_fmt_ratio(p.get('me_word/me_token'))}); TTFT "
                             f"{_fmt_ratio(r.get('me_word_ttft/me_token_ttft'))}")
        if ens.get("ce_mixture_ms_per_token") is not None:
            lines.append(f"    ce spends {ens['ce_mixture_ms_per_token']:.2f} ms a token on its numpy mixture; "
                         f"against a ce with a free mixture me/ce would be {_fmt_ratio(ens.get('me/ce_decode_only'))}")
        for member, v in r["single/" + BASELINE].items():
            lines.append(f"    single {member} / {BASELINE}: {_fmt_ratio(v)} "
                         f"(paired {_fmt_ratio(p['single/' + BASELINE].get(member))})")
        for key in (ens["cases"]["me"], ens["cases"].get("me_word")):
            me_case = result["cases"].get(key) if key else None
            if not me_case or not me_case.get("members"):
                continue
            if me_case.get("granularity") == "word":
                per = "  ".join(f"{x['name']} {x['selected']:.1f} words ({x.get('generated_tokens', 0):.1f} tokens), "
                                f"catch-up {x['catchup_tokens']:.1f}" for x in me_case["members"])
                lines.append(f"    {me_case['label']} per run: {per}")
            else:
                per = "  ".join(f"{x['name']} selected {x['selected']:.1f}, catch-up {x['catchup_tokens']:.1f}"
                                for x in me_case["members"])
                lines.append(f"    {me_case['label']} per run: {per}")
    mem = result.get("memory")
    if mem and "rss_mib" in mem:
        lines.append("")
        lines.append(f"  resident memory ({mem['model']}, n_ctx {mem['n_ctx']}): libraries {mem['rss_mib']['0']} MiB, "
                     f"1 member {mem['rss_mib']['1']} MiB, 2 members {mem['rss_mib']['2']} MiB "
                     f"({_fmt_ratio(mem['ratio_2_to_1'])}; file-backed {mem['file_backed_mib']['1']} -> "
                     f"{mem['file_backed_mib']['2']} MiB)")
    return "\n".join(lines)


def _format_evaluation(result: Mapping[str, Any]) -> list[str]:
    """The evaluation cases: scoring tokens/s beside the member's generation and prompt speeds."""
    rows: dict[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = {}
    for ens in result.get("ensembles", {}).values():
        for e in ens.get("evaluation", {}).values():
            case = result["cases"].get(e["case"])
            if case is not None and e["case"] not in rows:
                rows[e["case"]] = (case, e)
    if not rows:
        return []
    scored = max(int(c.get("scored_tokens", 0)) for c, _ in rows.values())
    lines = [
        "",
        f"  evaluation: the prompt text (~{scored} tokens, BOS excluded) scored by one member at token granularity "
        "(Engine.score: batched passes, logits at every position); tokens scored / wall time",
        f"  {'case':<50} {'scoring tokens/s':>24} {'rows/pass':>9} {'generation':>10} {'eval/gen':>9} "
        f"{'(paired)':>9} {'prompt tok/s':>12} {'prompt/gen':>10}",
    ]
    for case, e in rows.values():
        prompt = e.get("prompt_tokens_per_s")
        lines.append(
            f"  {case['label']:<50} {_fmt_summary(case['tokens_per_s'])} {e.get('rows_per_pass') or '-':>9} "
            f"{e['generation_tokens_per_s']:>10.1f} {_fmt_ratio(e['eval/generation']):>9} "
            f"{_fmt_ratio(e.get('paired_eval/generation')):>9} "
            f"{(f'{prompt:.1f}' if prompt is not None else '-'):>12} {_fmt_ratio(e.get('prompt/generation')):>10}")
    return lines


def run_bench(
    runner: BenchRunner,
    out_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Run the bench and write bench.json (and bench.png when matplotlib is importable)."""
    result = runner.run(progress)
    result["targets"] = [t.to_dict() for t in evaluate_targets(result)]
    written: list[Path] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "bench.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        written.append(path)
        png = out_dir / "bench.png"
        if write_chart(result, png):
            written.append(png)
    return result, written

