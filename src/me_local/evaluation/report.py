"""What ``me-local eval`` and ``me-local tune`` print: the JSON objects (``--json``, eval.json)
and the tables on the terminal, from the sums :mod:`.run` collects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.likelihood import UnitScores, WeightFit, bits_per_byte, perplexity_per_word
from .run import TaskTally, Totals, finite
from .stats import PairedDifference, paired_difference, wilson

METRICS = ("acc", "acc_norm")


def measures(logp: float, n_bytes: int, n_words: int) -> dict[str, float | None]:
    return {"log_likelihood": finite(logp), "bits_per_byte": finite(bits_per_byte(logp, n_bytes)),
            "perplexity_per_word": finite(perplexity_per_word(logp, n_words))}


def _named(names: Sequence[str], values: Sequence[float] | npt.NDArray[np.float64]) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values)}


# --------------------------------------------------------------------------- text


def text_report(ensemble: str, granularity: str, weights: Sequence[float], files: Sequence[tuple[str, Totals]],
                window_tokens: int) -> dict[str, Any]:
    """``me-local eval TEXTFILE...``'s JSON object."""
    names = files[0][1].members
    total = Totals.empty(names)
    per_file = []
    for path, t in files:
        total.merge(t)
        per_file.append({"path": path, "bytes": t.n_bytes, "words": t.n_words, "windows": t.windows,
                         "members": {n: measures(float(lp), t.n_bytes, t.n_words)
                                     for n, lp in zip(names, t.member_logp)},
                         "ensemble": measures(t.ensemble_logp, t.n_bytes, t.n_words)})
    return {
        "ensemble": {"name": ensemble, "granularity": granularity, "weights": _named(names, weights),
                     **measures(total.ensemble_logp, total.n_bytes, total.n_words)},
        "members": {n: measures(float(lp), total.n_bytes, total.n_words) for n, lp in zip(names, total.member_logp)},
        "bytes": total.n_bytes, "words": total.n_words, "windows": total.windows, "window_tokens": window_tokens,
        "files": per_file,
    }


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _weights_line(weights: Mapping[str, float]) -> str:
    return " ".join(f"{n}={w:.4g}" for n, w in weights.items())


def text_table(report: Mapping[str, Any]) -> str:
    ens = report["ensemble"]
    files = report["files"]
    lines = [f"ensemble {ens['name']} ({ens['granularity']} granularity), weights {_weights_line(ens['weights'])}",
             f"{len(files)} file{'s' * (len(files) != 1)}, {report['bytes']:,} bytes, {report['words']:,} words, "
             f"{report['windows']:,} window{'s' * (report['windows'] != 1)} of up to {report['window_tokens']:,} "
             "tokens", ""]
    rows = [*report["members"].items(), ("ensemble", ens)]
    width = max(8, *(len(n) for n, _ in rows))
    lines.append(f"  {'':<{width}}  {'log-likelihood':>15}  {'bits/byte':>9}  {'perplexity/word':>15}")
    for name, m in rows:
        lines.append(f"  {name:<{width}}  {_num(m['log_likelihood'], '15.2f')}  {_num(m['bits_per_byte'], '9.4f')}  "
                     f"{_num(m['perplexity_per_word'], '15.2f')}")
    if len(files) > 1:
        names = [*report["members"], "ensemble"]
        fw = max(4, *(len(f["path"]) for f in files))
        lines += ["", f"  bits per byte by file  {'':<{max(0, fw - 21)}}" + "  ".join(f"{n:>10}" for n in names)]
        for f in files:
            vals = [*(f["members"][n]["bits_per_byte"] for n in report["members"]), f["ensemble"]["bits_per_byte"]]
            lines.append(f"  {f['path']:<{max(fw, 21)}}" + "".join(f"  {_num(v, '10.4f')}" for v in vals))
    return "\n".join(lines)


# --------------------------------------------------------------------------- tasks


def task_report(task: str, ensemble: str, granularity: str, weights: Sequence[float], tally: TaskTally,
                delimiter: str, shapes: Mapping[str, int]) -> dict[str, Any]:
    """``me-local eval --task``'s JSON object."""
    names = tally.systems[:-1]
    systems: dict[str, dict[str, Any]] = {s: {} for s in tally.systems}
    difference: dict[str, Any] = {}
    for metric in METRICS:
        correct = tally.correct(metric)
        n = correct.shape[1]
        for i, s in enumerate(tally.systems):
            k = int(correct[i].sum())
            low, high = wilson(k, n)
            systems[s][metric] = finite(k / n) if n else None
            systems[s][f"{metric}_ci95"] = [finite(low), finite(high)]
            systems[s][f"{metric}_correct"] = k
        member_acc = correct[:-1].sum(axis=1)
        best = int(np.argmax(member_acc))  # the first of equals
        d = paired_difference(correct[-1], correct[best])
        difference[metric] = _difference(names[best], d)
    return {
        "task": task, "questions": tally.n, "shapes": dict(shapes), "delimiter": delimiter,
        "ensemble": {"name": ensemble, "granularity": granularity, "weights": _named(names, weights),
                     **systems["ensemble"]},
        "members": {n: systems[n] for n in names},
        "difference": difference,
    }


def _difference(best: str, d: PairedDifference) -> dict[str, Any]:
    return {"best_member": best, "value": finite(d.value), "ci95": [finite(d.low), finite(d.high)],
            "ensemble_only": d.a_only, "member_only": d.b_only, "mcnemar_p": d.p_value,
            "bootstrap": {"resamples": d.resamples, "seed": d.seed}}


def task_table(report: Mapping[str, Any]) -> str:
    ens = report["ensemble"]
    shapes = ", ".join(f"{n} {s}" for s, n in report["shapes"].items())
    lines = [f"task {report['task']}: {report['questions']:,} questions ({shapes}), each choice scored after "
             f"the context and {report['delimiter']!r}",
             f"ensemble {ens['name']} ({ens['granularity']} granularity), weights {_weights_line(ens['weights'])}", ""]
    rows = [*report["members"].items(), ("ensemble", ens)]
    width = max(8, *(len(n) for n, _ in rows))
    lines.append(f"  {'':<{width}}  {'acc':>6}  {'95% interval':<16}{'acc_norm':>8}  95% interval")
    for name, m in rows:
        cells = []
        for metric, w in (("acc", 6), ("acc_norm", 8)):
            lo, hi = m[f"{metric}_ci95"]
            cells.append(f"{_num(m[metric], f'{w}.3f')}  [{_num(lo, '.3f')}, {_num(hi, '.3f')}]".ljust(w + 18))
        lines.append(f"  {name:<{width}}  " + "".join(cells).rstrip())
    first = report["difference"]["acc"]["bootstrap"]
    lines += ["", f"ensemble minus the best member (95% paired bootstrap interval, {first['resamples']:,} resamples, "
              f"seed {first['seed']}; McNemar's exact test):"]
    for metric in METRICS:
        d = report["difference"][metric]
        lo, hi = d["ci95"]
        lines.append(f"  {metric:<8}  vs {d['best_member']}: {_num(d['value'], '+.3f')} [{_num(lo, '+.3f')}, "
                     f"{_num(hi, '+.3f')}]  right only in the ensemble {d['ensemble_only']}, only in "
                     f"{d['best_member']} {d['member_only']}; p = {d['mcnemar_p']:.3g}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- tune


def tune_report(ensemble: str, granularity: str, names: Sequence[str], current: Sequence[float], fit: WeightFit,
                fit_part: UnitScores, held: UnitScores, holdout: float, seed: int, files: Sequence[str]
                ) -> dict[str, Any]:
    """``me-local tune``'s JSON object (``written``/``backup`` are added by the command)."""
    hb = int(held.n_bytes.sum())
    fb = int(fit_part.n_bytes.sum())
    return {
        "ensemble": ensemble, "granularity": granularity, "files": list(files),
        "weights": _named(names, fit.weights),
        "current_weights": _named(names, np.asarray(current) / np.sum(current)),
        "holdout": {
            "members": {n: finite(bits_per_byte(float(held.logp[:, k].sum()), hb)) for k, n in enumerate(names)},
            "current": finite(bits_per_byte(held.total(current), hb)) if held.n_units else None,
            "fitted": finite(bits_per_byte(held.total(fit.weights), hb)) if held.n_units else None,
            "share": holdout, "seed": seed, "units": held.n_units, "bytes": hb,
        },
        "fit": {"units": fit_part.n_units, "bytes": fb, "iterations": fit.iterations, "converged": fit.converged,
                "log_likelihood": finite(fit.log_likelihood),
                "members": {n: finite(bits_per_byte(float(fit_part.logp[:, k].sum()), fb))
                            for k, n in enumerate(names)},
                "current": finite(bits_per_byte(fit_part.total(current), fb)),
                "fitted": finite(bits_per_byte(fit.log_likelihood, fb))},
        "written": None, "backup": None,
    }


def tune_table(report: Mapping[str, Any]) -> str:
    h, f = report["holdout"], report["fit"]
    unit = "tokens" if report["granularity"] == "token" else "units (words)"
    lines = [f"ensemble {report['ensemble']} ({report['granularity']} granularity): fitted on {f['units']:,} "
             f"{unit} ({f['bytes']:,} bytes), held out {h['units']:,} ({h['bytes']:,} bytes; a random "
             f"{h['share']:.0%}, seed {h['seed']})",
             f"EM: {f['iterations']} iteration{'s' * (f['iterations'] != 1)}"
             f"{'' if f['converged'] else ' (stopped before converging)'}", ""]
    names = list(report["weights"])
    width = max(16, *(len(n) + 6 for n in names))
    lines.append(f"  {'weights':<{width}}  {'current':>8}  {'fitted':>8}")
    for n in names:
        lines.append(f"  {n:<{width}}  {report['current_weights'][n]:8.4f}  {report['weights'][n]:8.4f}")
    lines += ["", f"  {'bits/byte':<{width}}  {'fit part':>8}  {'held out':>8}"]
    rows = [(f"{n} alone", f["members"][n], h["members"][n]) for n in names]
    rows += [("current weights", f["current"], h["current"]), ("fitted weights", f["fitted"], h["fitted"])]
    for label, a, b in rows:
        lines.append(f"  {label:<{width}}  {_num(a, '8.4f')}  {_num(b, '8.4f')}")
    if report.get("written"):
        lines += ["", f"wrote the fitted weights to {report['written']} (backup: {report['backup']})"]
    return "\n".join(lines)
