"""A small GGUF header reader: is this file a complete GGUF model, before llama.cpp sees it?

llama.cpp returns NULL for the broken files tried so far (truncated, not GGUF, unknown
architecture; see tests/test_model_files.py), but its messages go to its log and say
"failed to load model". Reading the header here first gives one line that names the
file, what is wrong with it and the fix, and does not depend on every llama.cpp
version handling every damaged file gracefully.

It reads (never maps) the header: magic, version, the key/value pairs (keeping
``general.architecture``, ``general.alignment`` and ``tokenizer.chat_template``), the
tensor infos, the aligned start of the data, and checks that every tensor's bytes lie
within the file.
Pure Python: no llama_cpp, no ``gguf`` package (that one is for tests only).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ModelLoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
REFETCH = "re-download or re-copy the file"

#: ggml tensor types: id -> (elements per block, bytes per block). A type not listed
#: here (a newer llama.cpp's) is not size-checked; llama.cpp checks it itself.
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# GGUF value types -> struct format of fixed-size scalars
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_UNSIGNED = (0, 2, 4, 10)
"""The unsigned integer types (a context length is one of them)."""
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


@dataclass(frozen=True)
class GgufHeader:
    version: int
    architecture: str | None
    n_tensors: int
    n_kv: int
    alignment: int
    data_offset: int
    data_end: int
    """Where the last tensor's bytes end: the size a complete file has at least."""
    file_size: int
    chat_template: str | None = None
    """``tokenizer.chat_template`` (None: the file has none)."""
    context_length: int | None = None
    """``<architecture>.context_length``: the context the model was trained with (None: not given)."""


class _Truncated(Exception):
    pass


class _Reader:
    """Sequential little-endian reads over a file, buffered, that fail past its end."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.size = size
        self.pos = 0
        self._buf = b""
        self._at = 0  # offset in the file of _buf[0]

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        end = self.pos + n
        if end > self._at + len(self._buf):
            self._f.seek(self.pos)
            self._buf = self._f.read(max(n, 1 << 20))
            self._at = self.pos
            if len(self._buf) < n:  # the file shrank while we read it
                raise _Truncated
        start = self.pos - self._at
        self.pos = end
        return self._buf[start : start + n]

    def need(self, n: int) -> None:
        """Fail now unless ``n`` more bytes are left."""
        if self.pos + n > self.size:
            raise _Truncated

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def unpack(self, fmt: str) -> int | float | bool:
        fmt = "<" + fmt
        value: int | float | bool = struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int(self.unpack("I"))

    def u64(self) -> int:
        return int(self.unpack("Q"))

    def string(self) -> bytes:
        return self.read(self.u64())

    def skip_string(self) -> None:
        self.skip(self.u64())


def _fail(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"model file {str(path)!r} {what}")


def read_gguf_header(path: Path) -> GgufHeader:
    """Read and check ``path``'s GGUF header; raises ModelLoadError naming the file and the fix."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _read(path, _Reader(f, size))
    except IsADirectoryError:
        raise _fail(path, "is a directory; name the .gguf file in it") from None
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc}); check its permissions") from None


def _read(path: Path, r: _Reader) -> GgufHeader:
    if r.size == 0:
        raise _fail(path, f"is empty (0 bytes); {REFETCH}")
    head = r.read(min(4, r.size))
    if head != MAGIC:
        if MAGIC.startswith(head):
            raise _fail(path, f"is truncated ({r.size} bytes); {REFETCH}")
        raise _fail(
            path,
            f"is not a GGUF model file (it starts with {head!r}, not b'GGUF'); name a .gguf file, "
            f"or {REFETCH} if it should be one",
        )
    try:
        version = r.u32()
        if version not in VERSIONS:
            if version == 1:
                raise _fail(path, "is GGUF version 1, which llama.cpp no longer reads; convert the model again")
            if struct.unpack(">I", struct.pack("<I", version))[0] in VERSIONS:
                raise _fail(path, "is a big-endian GGUF file; use the little-endian one")
            if VERSIONS[-1] < version < 256:  # a newer format: llama.cpp says whether it reads it
                return GgufHeader(version, None, 0, 0, DEFAULT_ALIGNMENT, r.pos, r.pos, r.size)
            raise _fail(path, f"has a damaged header (GGUF version {version}); {REFETCH}")
        n_tensors = r.u64()
        n_kv = r.u64()
        # a pair takes 13 bytes or more, a tensor info 24: larger counts cannot fit (and would loop long)
        r.need(13 * n_kv + 24 * n_tensors)
        architecture: str | None = None
        alignment = DEFAULT_ALIGNMENT
        chat_template: str | None = None
        lengths: dict[bytes, int] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.u32()
            if key == b"general.architecture" and vtype == _STRING:
                architecture = r.string().decode("utf-8", "replace")
            elif key == b"general.alignment" and vtype == 4:
                alignment = r.u32()
            elif key == b"tokenizer.chat_template" and vtype == _STRING:
                chat_template = r.string().decode("utf-8", "replace")
            elif key.endswith(b".context_length") and vtype in _UNSIGNED:
                lengths[key] = int(r.unpack(_SCALARS[vtype]))
            else:
                _skip_value(path, r, vtype, key)
        if alignment <= 0 or alignment & (alignment - 1):
            raise _fail(path, f"has a damaged header (alignment {alignment}); {REFETCH}")
        tensors: list[tuple[bytes, int, int, int]] = []  # name, type, n_elements (or -1), offset
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if n_dims > _MAX_DIMS:
                raise _fail(path, f"has a damaged tensor info ({name!r} has {n_dims} dimensions); {REFETCH}")
            dims = [r.u64() for _ in range(n_dims)]
            ttype = r.u32()
            offset = r.u64()
            tensors.append((name, ttype, _nbytes(ttype, dims), offset))
    except _Truncated:
        raise _fail(
            path, f"is truncated or damaged: its header runs past the end of the file ({r.size} bytes); {REFETCH}"
        ) from None
    data_offset = -(-r.pos // alignment) * alignment
    data_end = data_offset
    for name, _ttype, nbytes, offset in tensors:
        end = data_offset + offset + max(nbytes, 0)
        if end > r.size:
            raise _fail(
                path,
                f"is truncated: tensor {name.decode('utf-8', 'replace')!r} ends at byte {end} but the file "
                f"has {r.size} bytes; {REFETCH}",
            )
        data_end = max(data_end, end)
    context_length = lengths.get(f"{architecture}.context_length".encode()) if architecture else None
    return GgufHeader(version, architecture, n_tensors, n_kv, alignment, data_offset, data_end, r.size,
                      chat_template, context_length)


def _skip_value(path: Path, r: _Reader, vtype: int, key: bytes) -> None:
    if vtype in _SCALARS:
        r.skip(struct.calcsize(_SCALARS[vtype]))
    elif vtype == _STRING:
        r.skip_string()
    elif vtype == _ARRAY:
        etype = r.u32()
        count = r.u64()
        if etype in _SCALARS:
            r.skip(count * struct.calcsize(_SCALARS[etype]))
        elif etype == _STRING:
            r.need(8 * count)
            for _ in range(count):
                r.skip_string()
        elif etype == _ARRAY:
            r.need(12 * count)
            for _ in range(count):
                _skip_value(path, r, _ARRAY, key)
        else:
            raise _fail(path, f"has a damaged header (key {key!r} has array type {etype}); {REFETCH}")
    else:
        raise _fail(path, f"has a damaged header (key {key!r} has type {vtype}); {REFETCH}")


def _nbytes(ttype: int, dims: list[int]) -> int:
    """The tensor's size in bytes, or -1 for a type this reader does not know."""
    sizes = GGML_TYPE_SIZES.get(ttype)
    if sizes is None:
        return -1
    block, type_size = sizes
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size
