"""models.yaml -> typed, validated dataclasses.

Every setting's default and bounds come from :mod:`me_local.settings`, the
table the command line, both HTTP APIs and chat's ``/set`` check against too.
Errors are :class:`~me_local.errors.ConfigError` naming the file, the key and
the fix.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import assembled, chat_templates
from . import settings as S
from .errors import ConfigError, RequestError
from .settings import Setting, show_number

MODES = S.MODE.choices
PKG_SCHEME = "pkg://"
ENV_CONFIG = "ME_LOCAL_CONFIG"

_ENSEMBLE_KEYS = S.yaml_keys("ensemble") | {"members", "sampling"}
KV_CACHE_TYPES = S.KV_CACHE_TYPE.choices
_MEMBER_KEYS = S.yaml_keys("member") | {"name", "path"}
REPACK_SETTINGS = S.REPACK.choices
"""A member's ``repack``: whether llama.cpp may repack its weights for faster CPU kernels
(llama_model_params.use_extra_bufts). ``auto``: off on CPUs with AMX (llama.cpp#20824), on elsewhere."""
_SAMPLING_KEYS = S.yaml_keys("sampling")
assert S.WEIGHT.lo is not None and S.WEIGHT.hi is not None
_MIN_WEIGHT, _MAX_WEIGHT = S.WEIGHT.lo, S.WEIGHT.hi
_MAX_WEIGHT_TEXT = show_number(_MAX_WEIGHT)


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-ensemble defaults for requests that do not set these themselves."""

    temperature: float = S.TEMPERATURE.default
    top_k: int = S.TOP_K.default
    top_p: float = S.TOP_P.default
    min_p: float = S.MIN_P.default
    max_tokens: int = S.MAX_TOKENS.default
    stop: tuple[str, ...] = S.STOP.default
    """Stop strings every request of the ensemble has, beside its own (a base model that never
    ends its turn needs one, such as ``"\nUser:"``)."""
    repeat_penalty: float = S.REPEAT_PENALTY.default
    repeat_last_n: int = S.REPEAT_LAST_N.default
    frequency_penalty: float = S.FREQUENCY_PENALTY.default
    presence_penalty: float = S.PRESENCE_PENALTY.default
    logit_bias: tuple[tuple[int, float], ...] = S.LOGIT_BIAS.default
    """(token id, bias) pairs, sorted: every request of the ensemble has them, under its own."""


@dataclass(frozen=True)
class MemberConfig:
    name: str
    path: str
    """The path as written in the file (a file path or pkg://PACKAGE/FILE)."""
    base_dir: Path
    """Directory relative paths are resolved against (the YAML file's)."""
    weight: float = S.WEIGHT.default
    system: str | None = S.SYSTEM.default
    chat_template: str | None = S.CHAT_TEMPLATE.default
    """As written in models.yaml: a built-in's name or Jinja text (checked); None: the file's own.
    :func:`me_local.chat_templates.choose` says what it means for a file."""
    n_gpu_layers: int = S.N_GPU_LAYERS.default
    n_threads: int | None = S.N_THREADS.default
    repack: str = S.REPACK.default
    """auto | on | off: see REPACK_SETTINGS."""
    mmap: bool = S.MMAP.default
    """Map the file instead of reading the weights into memory. Then the file must be replaced
    with ``mv`` (a new inode), never written in place: a write or truncation under the mapping
    kills the process with SIGBUS."""
    key: str = ""
    """Where this member sits in the file, e.g. ``ensembles.default.members[0]``."""
    file: str = ""

    def resolve_path(self, *, assemble: bool = True) -> Path:
        """The model file on disk; raises ConfigError naming the fix when it is not there.
        A file a package assembles (see :mod:`me_local.assembled`) is assembled now if it is
        not yet in the cache; ``assemble=False`` only checks that it can be and gives its path."""
        path = resolve_model_path(self.path, self.base_dir, file=self.file, key=f"{self.key}.path",
                                  assemble=assemble)
        if not assemble and not path.exists() and is_package_path(self.path):
            return path  # to be assembled on first use
        if path.is_dir():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it has {', '.join(ggufs[:3])}{', ...' if len(ggufs) > 3 else ''})" if ggufs else ""
            raise ConfigError(
                f"model path {str(path)!r} is a directory; name the .gguf file in it{hint}",
                file=self.file,
                key=f"{self.key}.path",
            )
        if not path.is_file():
            raise ConfigError(
                f"model file {str(path)!r} does not exist; fix the path or put the GGUF file there",
                file=self.file,
                key=f"{self.key}.path",
            )
        return path


@dataclass(frozen=True)
class EnsembleConfig:
    name: str
    members: tuple[MemberConfig, ...]
    mode: str = S.MODE.default
    granularity: str | None = S.GRANULARITY.default
    """token | word; None: token when the members share a vocabulary, else word (decided at load)."""
    n_ctx: int = S.N_CTX.default
    max_ctx: int | None = S.MAX_CTX.default
    """The largest context a request may ask for; None: :attr:`ctx_ceiling`'s default."""
    parallel: int = S.PARALLEL.default
    max_queue: int = S.MAX_QUEUE.default
    n_batch: int = S.N_BATCH.default
    member: str | None = S.MEMBER.default
    """The member `single` mode uses when none is named (default: the first)."""
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    kv_cache_type: str = S.KV_CACHE_TYPE.default
    """Element type of each context's KV cache: f16, or q8_0 / q4_0 to halve / quarter its memory."""
    file: str = ""

    @property
    def ctx_ceiling(self) -> int:
        """The largest context a request may ask for: ``max_ctx``, else the larger of n_ctx and
        :data:`~me_local.settings.MAX_CTX_DEFAULT`."""
        return self.max_ctx if self.max_ctx is not None else max(self.n_ctx, S.MAX_CTX_DEFAULT)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def get_member(self, name: str) -> MemberConfig:
        for m in self.members:
            if m.name == name:
                return m
        raise RequestError(
            f"ensemble {self.name!r} has no member {name!r}; choose one of: {', '.join(self.member_names)}",
            param="member",
            code="member_not_found",
        )

    def with_weights(self, weights: Mapping[str, float]) -> EnsembleConfig:
        """A copy with the given members' weights replaced (others keep theirs)."""
        for name in weights:
            self.get_member(name)
        members = tuple(replace(m, weight=float(weights.get(m.name, m.weight))) for m in self.members)
        _check_weights([m.weight for m in members], file=None, key="weights", names=[m.name for m in members])
        return replace(self, members=members)

    def normalized_weights(self) -> list[float]:
        total = sum(m.weight for m in self.members)
        return [m.weight / total for m in self.members]


@dataclass(frozen=True)
class Config:
    path: Path
    ensembles: dict[str, EnsembleConfig]

    def get(self, name: str | None) -> EnsembleConfig:
        if name is None:
            name = "default" if "default" in self.ensembles else next(iter(self.ensembles))
        try:
            return self.ensembles[name]
        except KeyError:
            raise ConfigError(
                f"no ensemble named {name!r}; choose one of: {', '.join(self.ensembles)}",
                file=str(self.path),
                key="ensembles",
            ) from None


# --------------------------------------------------------------------------- paths


def packaged_config_path() -> Path:
    return Path(__file__).with_name("models.yaml")


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: --config, $ME_LOCAL_CONFIG, ./models.yaml,
    ~/.config/me-local/models.yaml, then the copy shipped inside the package."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env).expanduser()
    candidates = [
        Path.cwd() / "models.yaml",
        Path("~/.config/me-local/models.yaml").expanduser(),
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return packaged_config_path()


def is_package_path(path: str) -> bool:
    return path.startswith(PKG_SCHEME)


def resolve_model_path(path: str, base_dir: Path, *, file: str = "", key: str = "path",
                       assemble: bool = True) -> Path:
    """Resolve a member path: ``pkg://PACKAGE/FILE`` or a file path relative to base_dir.

    ``pkg://PACKAGE/FILE`` is the file FILE inside the installed package, or, when the
    package has no such file but assembles one of that name from chunk packages, the
    assembled file in the user's cache (:mod:`me_local.assembled`; assembled here on first
    use unless ``assemble`` is False)."""
    if path.startswith(PKG_SCHEME):
        rest = path[len(PKG_SCHEME) :]
        package, _, inner = rest.partition("/")
        if not package or not inner:
            raise ConfigError(
                f"{path!r} is not a valid package path; write pkg://PACKAGE/FILE", file=file, key=key
            )
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"Python package {package!r} is not installed; install it with {assembled.install_command(package)}",
                file=file,
                key=key,
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / inner
            if candidate.is_file():
                return candidate
        module = assembled.assembler(package, inner, file=file, key=key)
        if module is not None:
            return assembled.assembled_path(module, inner, file=file, key=key, assemble=assemble)
        return Path(next(iter(spec.submodule_search_locations))) / inner
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    return p


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a models.yaml. Raises ConfigError."""
    cfg_path = find_config(path)
    fname = str(cfg_path)
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "config file not found; pass --config PATH or create it (see the README's models.yaml reference)",
            file=fname,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the config file ({reason}); check its permissions", file=fname) from None
    return parse_config(text, cfg_path)


def parse_config(text: str, cfg_path: Path) -> Config:
    fname = str(cfg_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}invalid YAML ({problem}); fix the syntax", file=fname) from None
    if not isinstance(data, dict):
        raise ConfigError("the file must be a mapping with an `ensembles:` key", file=fname)
    unknown = set(data) - {"ensembles"}
    if unknown:
        raise ConfigError(
            f"unknown key {sorted(map(str, unknown))[0]!r}; the only top-level key is `ensembles`", file=fname
        )
    ensembles_raw = data.get("ensembles")
    if not isinstance(ensembles_raw, dict) or not ensembles_raw:
        raise ConfigError(
            "must be a mapping of ensemble names to ensembles, with at least one",
            file=fname,
            key="ensembles",
        )
    base_dir = cfg_path.parent.resolve()
    ensembles = {}
    for name, raw in ensembles_raw.items():
        ensembles[str(name)] = _parse_ensemble(str(name), raw, base_dir, fname)
    return Config(path=cfg_path, ensembles=ensembles)


def _unknown_keys(raw: Mapping[str, Any], allowed: set[str], *, file: str, key: str) -> None:
    extra = sorted(set(map(str, raw)) - allowed)
    if extra:
        raise ConfigError(
            f"unknown key {extra[0]!r}; allowed keys are: {', '.join(sorted(allowed))}", file=file, key=key
        )


def _opt_int(raw: Mapping[str, Any], s: Setting[Any], *, file: str, key: str) -> int | None:
    """The integer setting ``s`` of ``raw`` (its default when absent or null), within its bounds."""
    value = raw.get(s.name)
    if value is None:
        default: int | None = s.default
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}", file=file, key=f"{key}.{s.name}")
    if s.lo is not None and value < s.lo:
        raise ConfigError(f"must be at least {s.lo}, got {value}", file=file, key=f"{key}.{s.name}")
    if s.hi is not None and value > s.hi:
        raise ConfigError(f"must be at most {show_number(s.hi)}, got {value}", file=file, key=f"{key}.{s.name}")
    return value


def _int(raw: Mapping[str, Any], s: Setting[int], *, file: str, key: str) -> int:
    value = _opt_int(raw, s, file=file, key=key)
    assert value is not None  # s has a default
    return value


def _float(raw: Mapping[str, Any], s: Setting[float], *, file: str, key: str) -> float:
    """The number setting ``s`` of ``raw`` (its default when absent), within its bounds."""
    value = raw.get(s.name, s.default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"must be a number, got {value!r}", file=file, key=f"{key}.{s.name}")
    assert s.lo is not None and s.hi is not None
    if not s.lo <= value <= s.hi:
        raise ConfigError(f"must be between {s.lo} and {s.hi}, got {value}", file=file, key=f"{key}.{s.name}")
    return float(value)


def _stop_strings(value: Any, *, file: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ConfigError("must be a string or a list of non-empty strings", file=file, key=key)
    if len(items) > S.STOP.hi:  # type: ignore[operator]
        raise ConfigError(f"may list at most {S.STOP.hi} strings, got {len(items)}", file=file, key=key)
    return tuple(items)


def _logit_bias(value: Any, *, file: str, key: str) -> tuple[tuple[int, float], ...]:
    """A mapping of token ids to biases (``{13: -100}``), as (id, bias) pairs sorted by id."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(f"must be a mapping of token ids to biases, such as {{13: -100}}, got {value!r}",
                          file=file, key=key)
    pairs = {}
    for token, bias in value.items():
        try:
            tid, b = S.logit_bias_entry(token, bias)
        except ValueError as exc:
            raise ConfigError(str(exc), file=file, key=key) from None
        pairs[tid] = b
    return tuple(sorted(pairs.items()))


def _choice(value: Any, s: Setting[str] | Setting[str | None], *, file: str, key: str) -> str:
    if value not in s.choices:
        raise ConfigError(f"must be one of {', '.join(s.choices)}, got {value!r}", file=file, key=f"{key}.{s.name}")
    return str(value)


def _check_weights(weights: list[float], *, file: str | None, key: str, names: list[str]) -> None:
    for name, w in zip(names, weights):
        if w < _MIN_WEIGHT or not math.isfinite(w):
            raise ConfigError(f"weight of member {name!r} is {w}; weights must be >= {_MIN_WEIGHT}", file=file,
                              key=key)
        if w > _MAX_WEIGHT:
            raise ConfigError(f"weight of member {name!r} is {w}; weights must be at most {_MAX_WEIGHT_TEXT}",
                              file=file, key=key)
    if sum(weights) <= 0:
        raise ConfigError("all weights are zero; give at least one member a positive weight", file=file, key=key)


def _parse_ensemble(name: str, raw: Any, base_dir: Path, fname: str) -> EnsembleConfig:
    key = f"ensembles.{name}"
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping with a `members:` list", file=fname, key=key)
    _unknown_keys(raw, _ENSEMBLE_KEYS, file=fname, key=key)
    mode = _choice(raw.get("mode", S.MODE.default), S.MODE, file=fname, key=key)
    granularity = raw.get("granularity")
    if granularity is not None:
        granularity = _choice(granularity, S.GRANULARITY, file=fname, key=key)
    members_raw = raw.get("members")
    if not isinstance(members_raw, list) or not members_raw:
        raise ConfigError("must be a non-empty list of members", file=fname, key=f"{key}.members")
    members: list[MemberConfig] = []
    seen: set[str] = set()
    for i, mraw in enumerate(members_raw):
        mkey = f"{key}.members[{i}]"
        member = _parse_member(mraw, base_dir, fname, mkey)
        if member.name in seen:
            raise ConfigError(
                f"duplicate member name {member.name!r}; give each member a unique name",
                file=fname,
                key=f"{mkey}.name",
            )
        seen.add(member.name)
        members.append(member)
    _check_weights(
        [m.weight for m in members], file=fname, key=f"{key}.members", names=[m.name for m in members]
    )
    sampling_raw = raw.get("sampling", {}) or {}
    if not isinstance(sampling_raw, dict):
        raise ConfigError("must be a mapping", file=fname, key=f"{key}.sampling")
    skey = f"{key}.sampling"
    _unknown_keys(sampling_raw, _SAMPLING_KEYS, file=fname, key=skey)
    sampling = SamplingDefaults(
        temperature=_float(sampling_raw, S.TEMPERATURE, file=fname, key=skey),
        top_k=_int(sampling_raw, S.TOP_K, file=fname, key=skey),
        top_p=_float(sampling_raw, S.TOP_P, file=fname, key=skey),
        min_p=_float(sampling_raw, S.MIN_P, file=fname, key=skey),
        max_tokens=_int(sampling_raw, S.MAX_TOKENS, file=fname, key=skey),
        stop=_stop_strings(sampling_raw.get("stop"), file=fname, key=f"{skey}.stop"),
        repeat_penalty=_float(sampling_raw, S.REPEAT_PENALTY, file=fname, key=skey),
        repeat_last_n=_int(sampling_raw, S.REPEAT_LAST_N, file=fname, key=skey),
        frequency_penalty=_float(sampling_raw, S.FREQUENCY_PENALTY, file=fname, key=skey),
        presence_penalty=_float(sampling_raw, S.PRESENCE_PENALTY, file=fname, key=skey),
        logit_bias=_logit_bias(sampling_raw.get("logit_bias"), file=fname, key=f"{skey}.logit_bias"),
    )
    kv_cache_type = _choice(raw.get("kv_cache_type", S.KV_CACHE_TYPE.default), S.KV_CACHE_TYPE, file=fname, key=key)
    default_member = raw.get("member", S.MEMBER.default)
    if default_member is not None and default_member not in seen:
        raise ConfigError(
            f"names no member ({default_member!r}); choose one of: {', '.join(m.name for m in members)}",
            file=fname,
            key=f"{key}.member",
        )
    return EnsembleConfig(
        name=name,
        members=tuple(members),
        mode=mode,
        granularity=granularity,
        n_ctx=_int(raw, S.N_CTX, file=fname, key=key),
        max_ctx=_opt_int(raw, S.MAX_CTX, file=fname, key=key),
        parallel=_int(raw, S.PARALLEL, file=fname, key=key),
        max_queue=_int(raw, S.MAX_QUEUE, file=fname, key=key),
        n_batch=_int(raw, S.N_BATCH, file=fname, key=key),
        member=default_member,
        sampling=sampling,
        kv_cache_type=kv_cache_type,
        file=fname,
    )


def _parse_member(raw: Any, base_dir: Path, fname: str, key: str) -> MemberConfig:
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping with `name` and `path`", file=fname, key=key)
    _unknown_keys(raw, _MEMBER_KEYS, file=fname, key=key)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ConfigError(
            f"must be a non-empty name without '/', got {name!r}", file=fname, key=f"{key}.name"
        )
    path = raw.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(
            "missing; give a GGUF file path or pkg://PACKAGE/FILE", file=fname, key=f"{key}.path"
        )
    weight = raw.get("weight", S.WEIGHT.default)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"must be a number, got {weight!r}", file=fname, key=f"{key}.weight")
    if weight < _MIN_WEIGHT:
        raise ConfigError(f"must be >= {_MIN_WEIGHT}, got {weight}", file=fname, key=f"{key}.weight")
    if weight > _MAX_WEIGHT:
        raise ConfigError(f"must be at most {_MAX_WEIGHT_TEXT}, got {weight}", file=fname, key=f"{key}.weight")
    system = raw.get("system", S.SYSTEM.default)
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"must be a string, got {system!r}", file=fname, key=f"{key}.system")
    chat_template = raw.get("chat_template", S.CHAT_TEMPLATE.default)
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ConfigError(
                f"must be a built-in's name ({chat_templates.names()}) or a Jinja template, got {chat_template!r}",
                file=fname, key=f"{key}.chat_template",
            )
        problem = chat_templates.problem(chat_template)
        if problem is not None:
            raise ConfigError(problem, file=fname, key=f"{key}.chat_template")
    n_gpu_layers = raw.get("n_gpu_layers", S.N_GPU_LAYERS.default)
    lowest = S.N_GPU_LAYERS.lo
    assert lowest is not None
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < lowest:
        raise ConfigError(
            f"must be an integer >= {lowest} (0 CPU, -1 all layers), got {n_gpu_layers!r}",
            file=fname,
            key=f"{key}.n_gpu_layers",
        )
    n_threads = _opt_int(raw, S.N_THREADS, file=fname, key=key)
    repack = raw.get("repack", S.REPACK.default)
    if isinstance(repack, bool):  # YAML 1.1 reads a bare on/off as true/false
        repack = "on" if repack else "off"
    repack = _choice(repack, S.REPACK, file=fname, key=key)
    mmap = raw.get("mmap", S.MMAP.default)
    if not isinstance(mmap, bool):
        raise ConfigError(f"must be true or false, got {mmap!r}", file=fname, key=f"{key}.mmap")
    return MemberConfig(
        name=name,
        path=path,
        base_dir=base_dir,
        weight=float(weight),
        system=system,
        chat_template=chat_template,
        n_gpu_layers=n_gpu_layers,
        n_threads=n_threads,
        repack=repack,
        mmap=mmap,
        key=key,
        file=fname,
    )


def parse_weights(text: str) -> dict[str, float]:
    """Parse ``name=0.7,name=0.3`` (the --weights flag and /set weights)."""
    weights: dict[str, float] = {}
    for name, value in S.comma_pairs(text):
        try:
            if value is None:
                raise ValueError
            w = float(value)
        except ValueError:
            raise RequestError(
                f"cannot read weights {text!r}; write them as name=0.7,name=0.3", param="weights"
            ) from None
        if w < _MIN_WEIGHT or not math.isfinite(w):
            raise RequestError(f"weight of {name!r} is {value}; weights must be >= {_MIN_WEIGHT}", param="weights")
        if w > _MAX_WEIGHT:
            raise RequestError(f"weight of {name!r} is {value}; weights must be at most {_MAX_WEIGHT_TEXT}",
                               param="weights")
        weights[name] = w
    if not weights:
        raise RequestError(f"cannot read weights {text!r}; write them as name=0.7,name=0.3", param="weights")
    return weights
