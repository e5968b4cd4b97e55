"""What the CPU can do, and the load-time choices that depend on it.

Pure Python (no llama_cpp import), so the decision is tested with given flag sets
on any machine; ``backends/llama/model.py`` (``LoadSettings``) applies it when it loads a model.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from ..config import REPACK_SETTINGS

#: The /proc/cpuinfo flags of Intel's Advanced Matrix Extensions.
AMX_FLAGS = frozenset({"amx_int8", "amx_tile", "amx_bf16"})

#: llama.cpp's AMX matmul (the AMX extra buffer type, used when weights are repacked)
#: segfaults in llama_decode for every batch of 2 or more tokens: upstream llama.cpp#20824.
AMX_ISSUE = "llama.cpp#20824"


#: Flags that decide which llama.cpp CPU kernels run (worth writing beside a measurement).
FLAGS_THAT_MATTER = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "i8mm")


def flags_that_matter(flags: frozenset[str] | set[str]) -> list[str]:
    return [f for f in FLAGS_THAT_MATTER if f in flags]


def read_cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The flags of the first processor listed in ``path`` (empty where there is none, e.g. macOS)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags, read once."""
    return read_cpu_flags()


def decide_repack(setting: str, flags: frozenset[str] | set[str]) -> tuple[bool, str]:
    """Whether llama.cpp may repack weights into its extra CPU buffer types, and why.

    ``setting`` is a member's ``repack`` (auto, on, off). ``auto`` turns repacking off
    on a CPU with AMX, where llama.cpp would put the weights in its AMX buffer and crash
    on the first batch of 2+ tokens (llama.cpp#20824), and on everywhere else, where the
    repacked Q4_0 / Q4_K / IQ4_NL kernels can speed up batches.
    """
    amx = sorted(AMX_FLAGS & set(flags))
    if setting == "off":
        return False, "set in models.yaml"
    if setting == "on":
        if amx:
            return True, f"set in models.yaml, although this CPU has AMX ({AMX_ISSUE}: batches may crash)"
        return True, "set in models.yaml"
    if setting != "auto":
        raise ValueError(f"repack must be one of {', '.join(REPACK_SETTINGS)}, got {setting!r}")
    if amx:
        return False, f"this CPU has AMX ({AMX_ISSUE})"
    return True, "this CPU has no AMX"
