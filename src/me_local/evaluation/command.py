"""``me-local eval`` and ``me-local tune`` (registered lazily: ``me_local.cli.LAZY_COMMANDS``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import settings as S
from ..cli.options import setting_option
from ..config import load_config, packaged_config_path, parse_weights
from ..errors import ConfigError, RequestError, UsageError
from .generate import DEFAULT_ANSWER_REGEX

if TYPE_CHECKING:
    from ..engine import Engine
    from .remote import RemoteScorer
    from .run import Scorer


def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The flags eval and tune share."""
    options = [
        click.option("--config", "config_path", type=click.Path(),
                     help="models.yaml to use (default: $ME_LOCAL_CONFIG, ./models.yaml, "
                          "~/.config/me-local/models.yaml, then the packaged one)."),
        click.option("--ensemble", "-e", default=None, help="Ensemble name (default: `default`)."),
        setting_option(S.WEIGHT, dest="weights", type=click.STRING,
                       help="Override weights: name=0.7,name=0.3 (the ensemble's figures use these)."),
        setting_option(S.GRANULARITY, help="Score word by word or token by token (default: the ensemble's; "
                                           "token needs one shared vocabulary)."),
        click.option("--window", type=int, default=None,
                     help="Tokens per window of a long text (default: the members' n_ctx less the BOS and a "
                          "margin)."),
        click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object on stdout."),
        click.option("--url", default=None, help="Score through a running `me-local serve` at this URL."),
        click.option("--api-key", envvar="ME_LOCAL_API_KEY", default=None, help="API key for --url."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


class Session:
    """What a command scores with: in-process (an engine over models.yaml) or a daemon (--url).
    The models load on first use (:meth:`scorer`), so a refusal can come before that."""

    def __init__(self, ensemble: str, names: tuple[str, ...], current: list[float], granularity: str | None,
                 override: dict[str, float] | None, *, engine: Engine | None = None,
                 remote: RemoteScorer | None = None) -> None:
        self.ensemble = ensemble
        self.names = names
        self.current = current
        """The ensemble's weights (with --weights), normalised, in member order."""
        self.granularity = granularity
        self.override = override
        self.engine = engine
        self.remote = remote

    def resolved_granularity(self) -> str:
        if self.remote is not None:
            return self.remote.granularity
        assert self.engine is not None
        return self.granularity or self.engine.ensemble(self.ensemble).vocabulary.granularity

    def scorer(self) -> Scorer:
        if self.remote is not None:
            return self.remote
        from .run import EngineScorer

        assert self.engine is not None
        return EngineScorer(self.engine, self.ensemble, self.override, self.granularity)

    def counter(self) -> tuple[Callable[[str], list[int]], int, int]:
        """Token counts per distinct vocabulary, the smallest member context, the BOS's tokens."""
        if self.remote is not None:
            return self.remote.count, self.remote.n_ctx, self.remote.context_tokens()
        assert self.engine is not None
        members = self.engine.ensemble(self.ensemble).members
        distinct = list({id(m.model): m for m in members}.values())
        n_ctx = min(m.n_ctx for m in members)
        bos = max(len(m.raw_prompt("")) or 1 for m in members)

        def count(text: str) -> list[int]:
            return [len(m.tokenize_text(text)) for m in distinct]

        return count, n_ctx, bos

    def check_spelling(self, paths: tuple[str, ...]) -> None:
        """At word granularity, every file must be spelled back by every member's tokens (in-process;
        a daemon says so for the window it meets it in)."""
        from .run import check_spelling

        if self.engine is None or self.resolved_granularity() != "word":
            return
        members = self.engine.ensemble(self.ensemble).members
        distinct = list({id(m.model): m for m in members}.values())
        for p in paths:
            check_spelling(p, distinct)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _session(config_path: str | None, ensemble: str | None, weights: str | None, granularity: str | None,
             url: str | None, api_key: str | None) -> Session:
    override = parse_weights(weights) if weights else None
    if url:
        if config_path:
            raise UsageError("--config is for runs in this process; with --url the daemon's models.yaml is used: "
                             "give one or the other")
        from .remote import RemoteScorer

        remote = RemoteScorer(url, ensemble, api_key=api_key, weights=override, granularity=granularity)
        return Session(remote.ensemble, remote.names, remote.weights, granularity, override, remote=remote)
    config = load_config(config_path)
    cfg = config.get(ensemble)
    if override:
        try:
            cfg = cfg.with_weights(override)
        except ConfigError as exc:
            raise RequestError(exc.reason, param="weights") from None
    from ..engine import Engine

    return Session(cfg.name, tuple(cfg.member_names), cfg.normalized_weights(), granularity, override,
                   engine=Engine(config))


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal; otherwise nothing is drawn."""
    if total <= 0 or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_percent=True) as bar:
        yield bar.update


def _emit(report: dict[str, Any], table: str, as_json: bool, out: str | None, name: str) -> None:
    text = json.dumps(report, ensure_ascii=False, indent=2)
    if out:
        d = Path(out)
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {d / name} ({exc.strerror or exc}); choose another --out") from None
    click.echo(text if as_json else table)


@contextmanager
def _interruptible() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)


# --------------------------------------------------------------------------- eval


@click.command("eval")
@click.argument("textfiles", nargs=-1, type=click.Path(dir_okay=False))
@common_options
@click.option("--task", "task_path", type=click.Path(dir_okay=False), default=None,
              help="A multiple-choice task file (JSON Lines; see docs/eval.md): report accuracy instead.")
@click.option("--delimiter", default=" ", show_default="a space",
              help="Put between a question's context and each choice (lm-evaluation-harness's target_delimiter).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N questions of --task.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write eval.json (and with --generate the answers, samples.jsonl) into this directory.")
@click.option("--generate", "by_generation", is_flag=True,
              help="With --task: ask each question and read the letter from the generated answer, per decoding mode "
                   "(me, ce, each member), instead of comparing likelihoods.")
@click.option("--seeds", type=click.IntRange(1, 1000), default=None,
              help="--generate: answers per question and mode, seeds 0..N-1 (default 3).")
@click.option("--answer-regex", default=None,
              help=f"--generate: the answer's letter is the first match of this regular expression's group that is "
                   f"a choice's letter (default {DEFAULT_ANSWER_REGEX!r}).")
@setting_option(S.MAX_TOKENS, help="--generate: tokens per answer (default 16).")
@setting_option(S.TEMPERATURE, help="--generate: sampling temperature (default: the ensemble's).")
def eval_command(textfiles: tuple[str, ...], config_path: str | None, ensemble: str | None, weights: str | None,
                 granularity: str | None, window: int | None, as_json: bool, url: str | None, api_key: str | None,
                 task_path: str | None, delimiter: str, limit: int | None, out: str | None, by_generation: bool,
                 seeds: int | None, answer_regex: str | None, max_tokens: int | None,
                 temperature: float | None) -> None:
    """Measure an ensemble and each of its members on TEXTFILE... (log-likelihood, bits per byte,
    perplexity per word) or on a multiple-choice --task file (accuracy with 95% intervals, and
    the ensemble against its best member; with --generate, by generated answers per mode)."""
    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)

    if textfiles and task_path:
        raise UsageError("give TEXTFILE... or --task FILE, not both (run eval twice)")
    if not textfiles and not task_path:
        raise UsageError("nothing to evaluate: give TEXTFILE... (likelihood) or --task FILE.jsonl (accuracy)")
    if task_path and window is not None:
        raise UsageError("--window is for text files; a task's questions are scored whole")
    if textfiles and limit is not None:
        raise UsageError("--limit is for --task; for text files, give a shorter file")
    generate_only = [f"--{n.replace('_', '-')}" for n in ("seeds", "answer_regex", "max_tokens", "temperature")
                     if given(n)]
    if by_generation:
        if not task_path:
            raise UsageError("--generate asks the questions of a --task file; give --task FILE.jsonl")
        if url:
            raise UsageError("--generate runs in this process; drop --url")
        if given("delimiter"):
            raise UsageError("--delimiter is for scoring choices by likelihood; --generate asks the question instead")
    elif generate_only:
        raise UsageError(f"{generate_only[0]} is for --generate (answers generated per mode)")
    session = _session(config_path, ensemble, weights, granularity, url, api_key)
    try:
        with _interruptible():
            if by_generation:
                assert task_path is not None
                report, samples = _eval_generate(session, task_path, limit, seeds or 3,
                                                 answer_regex or DEFAULT_ANSWER_REGEX, max_tokens or 16, temperature)
                from .generate import generate_table

                _emit(report, generate_table(report), as_json, out, "eval.json")
                if out:
                    with open(Path(out) / "samples.jsonl", "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
            elif task_path:
                report = _eval_task(session, task_path, delimiter, limit)
                from .report import task_table

                _emit(report, task_table(report), as_json, out, "eval.json")
            else:
                report = _eval_texts(session, textfiles, window)
                from .report import text_table

                _emit(report, text_table(report), as_json, out, "eval.json")
    finally:
        session.close()


def _eval_texts(session: Session, paths: tuple[str, ...], window: int | None) -> dict[str, Any]:
    from .report import text_report
    from .run import TextScorer, window_budget

    _check_files(paths)
    count, n_ctx, bos = session.counter()
    budget = window_budget(n_ctx, bos, window)
    session.check_spelling(paths)
    total = sum(os.path.getsize(p) for p in paths)
    results = []
    with _progress(total, "scoring") as advance:
        scorer = TextScorer(session.scorer(), session.names, count, budget, advance=advance)
        for p in paths:
            results.append((p, scorer.file(p)))
    return text_report(session.ensemble, session.resolved_granularity(), session.current, results, budget)


def _check_files(paths: tuple[str, ...]) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise UsageError(f"{p!r} is not a file; give text files to evaluate")


def _eval_task(session: Session, path: str, delimiter: str, limit: int | None) -> dict[str, Any]:
    from .report import task_report
    from .run import TaskTally, score_question
    from .tasks import read_tasks

    if not os.path.isfile(path):
        raise UsageError(f"task file {path!r} does not exist; check the path")
    if session.remote is not None and session.resolved_granularity() == "word":
        raise UsageError("--task through --url needs an ensemble scored token by token: at word granularity the "
                         "daemon's echo scores one prompt, where a choice's first word counts differently than "
                         "after its context; run eval --task without --url (in this process)")
    if session.engine is not None:
        session.engine.ensemble(session.ensemble)  # load the models before the bar starts
    tally = TaskTally((*session.names, "ensemble"))
    score = session.scorer()
    shapes: dict[str, int] = {}
    total = _count_lines(path) if sys.stderr.isatty() else 0
    if limit is not None and total:
        total = min(total, limit)
    with _progress(total, "questions") as advance:
        for q in read_tasks(path):
            if limit is not None and tally.n >= limit:
                break
            cs = score_question(score, q, delimiter=delimiter, file=path)
            tally.add(cs)
            shapes[q.shape] = shapes.get(q.shape, 0) + 1
            advance(1)
    if tally.n == 0:
        raise UsageError(f"task file {path} has no questions (every line is blank)")
    return task_report(path, session.ensemble, session.resolved_granularity(), session.current, tally, delimiter,
                       shapes)


def _eval_generate(session: Session, path: str, limit: int | None, seeds: int, pattern: str, max_tokens: int,
                   temperature: float | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from ..engine import Request, collect, sampling_params
    from .generate import compile_extractor, generate_report, prompt, run_generate
    from .tasks import Question, read_tasks

    rx = compile_extractor(pattern)
    if not os.path.isfile(path):
        raise UsageError(f"task file {path!r} does not exist; check the path")
    questions: list[Question] = []
    for q in read_tasks(path):
        if limit is not None and len(questions) >= limit:
            break
        prompt(q)  # refuse a question it cannot ask before generating anything
        questions.append(q)
    if not questions:
        raise UsageError(f"task file {path} has no questions (every line is blank)")
    engine = session.engine
    assert engine is not None
    loaded = engine.ensemble(session.ensemble)
    cfg = loaded.config
    modes: list[tuple[str, str, int | None]] = [("me", "me", None)]
    if loaded.vocabulary.shared:
        modes.append(("ce", "ce", None))
    modes += [(f"single:{n}", "single", i) for i, n in enumerate(session.names)]
    base = sampling_params(cfg.sampling, max_tokens=max_tokens, temperature=temperature)

    def generate(message: str, mode: str, member: int | None, seed: int) -> str:
        request = Request(ensemble=session.ensemble, messages=[{"role": "user", "content": message}],
                          params=sampling_params(cfg.sampling, max_tokens=max_tokens, temperature=temperature,
                                                 seed=seed),
                          mode=mode, weights=session.override if member is None else None,
                          member=None if member is None else session.names[member],
                          granularity=session.granularity if mode == "me" else None)
        text, _ = collect(engine.generate(request))
        return text

    samples: list[dict[str, Any]] = []
    with _progress(len(questions) * len(modes), "answers") as advance:
        tallies = run_generate(questions, modes, generate, seeds=seeds, rx=rx, advance=advance, samples=samples)
    params = {"temperature": base.temperature, "top_k": base.top_k, "top_p": base.top_p, "min_p": base.min_p,
              "max_tokens": base.max_tokens}
    report = generate_report(path, session.ensemble, tallies, seeds=seeds, pattern=pattern, params=params)
    report["weights"] = dict(zip(session.names, session.current))
    return report, samples


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# --------------------------------------------------------------------------- tune


@click.command()
@click.argument("textfiles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@common_options
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Share of the text's units held out to measure the weights on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random hold-out split.")
@click.option("--write", is_flag=True,
              help="Write the fitted weights into the ensemble's models.yaml (after a backup), keeping the rest "
                   "of the file as it is.")
def tune(textfiles: tuple[str, ...], config_path: str | None, ensemble: str | None, weights: str | None,
         granularity: str | None, window: int | None, as_json: bool, url: str | None, api_key: str | None,
         holdout: float, seed: int, write: bool) -> None:
    """Fit the ensemble's weights to TEXTFILE... (maximum likelihood, by EM over each member's
    probabilities computed once) and compare them with the current weights on held-out text."""
    from ..core.likelihood import UnitScores, fit_weights, split_units
    from .report import tune_report, tune_table
    from .run import TextScorer, window_budget

    _check_files(textfiles)
    if url:
        raise UsageError("tune runs in this process: it needs each member's probability of every unit of the text, "
                         "which the daemon's API does not return; run it without --url (with --config)")
    session = _session(config_path, ensemble, weights, granularity, url, api_key)
    try:
        target = before = None
        if write:  # refuse before the work, not after
            assert session.engine is not None
            target, before = _writable(Path(session.engine.config.path), session)
        with _interruptible():
            count, n_ctx, bos = session.counter()
            budget = window_budget(n_ctx, bos, window)
            session.check_spelling(textfiles)
            total = sum(os.path.getsize(p) for p in textfiles)
            with _progress(total, "scoring") as advance:
                scorer = TextScorer(session.scorer(), session.names, count, budget, keep_units=True,
                                    advance=advance)
                for p in textfiles:
                    scorer.file(p)
            units = UnitScores.concat(scorer.units)
            if units.n_units < 2:
                raise UsageError("too little text to fit weights and hold part of it out; give more text")
            fit_part, held = split_units(units, holdout, seed=seed)
            fit = fit_weights(fit_part)
            report = tune_report(session.ensemble, session.resolved_granularity(), session.names, session.current,
                                 fit, fit_part, held, holdout, seed, textfiles)
            if target is not None and before is not None:
                written, backup = _write_weights(target, before, session, report["weights"])
                report["written"], report["backup"] = str(written), str(backup)
        click.echo(json.dumps(report, ensure_ascii=False, indent=2) if as_json else tune_table(report))
    finally:
        session.close()


def _writable(path: Path, session: Session) -> tuple[Path, str]:
    """The file --write will edit (symlinks followed) and its text now; refused, with the fix,
    for the packaged models.yaml, a file that cannot be written, or one that cannot be edited
    safely."""
    from .yamledit import set_weights

    real = path.resolve()
    if real == packaged_config_path().resolve():
        raise UsageError(
            f"{path} is the models.yaml shipped inside the me-local package (an upgrade replaces it); copy it "
            f"to ~/.config/me-local/models.yaml (mkdir -p ~/.config/me-local && cp {path} "
            "~/.config/me-local/models.yaml), which me-local then uses, and run tune --write again")
    if not os.access(real, os.W_OK) or not os.access(real.parent, os.W_OK):
        raise UsageError(f"cannot write {real} or a backup beside it (permission denied); fix the permissions, "
                         "or copy the file somewhere writable and pass --config")
    text = _read(real)
    set_weights(text, session.ensemble, dict(zip(session.names, session.current)), file=str(path))  # a dry run
    return real, text


def _read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as it is
        return f.read()


def _write_weights(path: Path, before: str, session: Session, weights: dict[str, float]) -> tuple[Path, Path]:
    """Back the file up, then replace it (atomically) with the weights written in."""
    from .yamledit import set_weights

    now = _read(path)
    if now != before:
        raise UsageError(f"{path} changed while tune ran; run tune --write again")
    new = set_weights(before, session.ensemble, weights, file=str(path))
    backup = path.with_name(path.name + ".bak")
    if backup.exists():
        backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        n = 1
        while backup.exists():
            backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}-{n}.bak")
            n += 1
    try:
        shutil.copy2(path, backup)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(new)
            shutil.copymode(path, tmp)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror or exc}); the file is unchanged") from None
    return path, backup
