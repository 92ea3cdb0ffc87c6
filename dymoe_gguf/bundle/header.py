"""A light reader of a GGUF file's header (key-value section and tensor table), without gguf's reader.

``gguf.GGUFReader`` maps the whole file and decodes every field, the tokenizer's vocabulary
included (seconds for a 150k-token vocabulary, and it fails on a file whose tensor data is
truncated). This module reads the header sequentially and decodes only what is asked for, which
is what recognising a bundle before replacing it, patching the checksum array written at convert
time, and keying the index cache need.

Layout (GGUF v2/v3, little-endian): ``magic "GGUF", u32 version, u64 n_tensors, u64 n_kv``; each
key-value is ``string key, u32 type, value`` (a string is ``u64 length, bytes``; an array is
``u32 item type, u64 count, items``); each tensor-table entry is ``string name, u32 n_dims,
u64 ne[n_dims], u32 ggml type, u64 offset``; data starts at the next multiple of
``general.alignment`` (32 when absent).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf import GGUFValueType as VT

_SCALARS = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
            VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_NUMPY = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
          VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8"}
_MAX_STRING = 1 << 30  # a longer string is corruption, not a header


class HeaderError(ValueError):
    """The bytes are not a (complete) GGUF header."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor-table entry: name, ggml ``ne`` (fastest dimension first), type, offset from data start."""

    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass
class Header:
    """What :func:`read_header` found: decoded values of the asked keys, where each value starts."""

    version: int
    n_tensors: int
    n_kv: int
    values: dict[str, object] = field(default_factory=dict)
    value_offsets: dict[str, int] = field(default_factory=dict)  # byte offset of each key's value
    array_lengths: dict[str, int] = field(default_factory=dict)  # item count of every array, decoded or not
    tensors: list[TensorEntry] = field(default_factory=list)  # when the tensor table was read
    data_start: int | None = None  # likewise


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size
        self.last_count = 0  # item count of the last array read

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise HeaderError(f"the header ends early (at byte {self.f.tell()} of {self.size})")
        return b

    def scalar(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, decode: bool = True) -> str | None:
        n = int(self.scalar("<Q"))
        if n > _MAX_STRING or self.f.tell() + n > self.size:
            raise HeaderError(f"a string of {n} bytes at byte {self.f.tell()} runs past the end of the file")
        if not decode:
            self.f.seek(n, 1)
            return None
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, decode: bool) -> object:
        if vtype == VT.STRING:
            return self.string(decode)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[VT(vtype)])
        if vtype != VT.ARRAY:
            raise HeaderError(f"unknown value type {vtype} at byte {self.f.tell()}")
        sub, count = int(self.scalar("<I")), int(self.scalar("<Q"))
        self.last_count = count
        if count > self.size:
            raise HeaderError(f"an array of {count} items at byte {self.f.tell()} cannot fit in the file")
        if sub in _NUMPY:
            nbytes = count * np.dtype(_NUMPY[VT(sub)]).itemsize
            if self.f.tell() + nbytes > self.size:
                raise HeaderError(f"an array of {count} items at byte {self.f.tell()} runs past the end of the file")
            if not decode:
                self.f.seek(nbytes, 1)
                return None
            return np.frombuffer(self.read(nbytes), dtype=_NUMPY[VT(sub)])
        items = [self.value(sub, decode) for _ in range(count)]
        self.last_count = count  # after any nested arrays
        return items if decode else None


def open_no_readahead(path: Path, buffering: int = 1 << 20) -> BinaryIO:
    """``path`` opened for reading without the kernel's read-ahead (``POSIX_FADV_RANDOM``, where it exists).

    A header is a few kilobytes to megabytes at the start of a file of gigabytes: sequential
    read-ahead would run on into the experts (8 MiB here, more on some devices), reading what the
    runtime is careful not to read. The advice applies to this open file only.
    """
    f = open(path, "rb", buffering=buffering)  # returned to the caller
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass
    return f


def read_header(path: Path, keys: set[str] | None = None, *, tensors: bool = False,
                skip: tuple[str, ...] = ()) -> Header:
    """Read ``path``'s header, decoding the values of ``keys`` (when None: every key not starting with
    one of ``skip``, e.g. ``("tokenizer.",)`` to step over a vocabulary without decoding it).

    Stops after the last asked key unless ``tensors`` is set, in which case the tensor table is
    read too and ``data_start`` is set. Raises :class:`HeaderError` on anything that is not a GGUF
    header, and ``OSError`` when the file cannot be read.
    """
    with open_no_readahead(path) as f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size)
        if r.read(4) != b"GGUF":
            raise HeaderError("not a GGUF file (no GGUF magic)")
        version = int(r.scalar("<I"))
        if version not in (2, 3):
            raise HeaderError(f"GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors, n_kv = int(r.scalar("<Q")), int(r.scalar("<Q"))
        if n_kv > size or n_tensors > size:
            raise HeaderError(f"implausible counts ({n_kv} keys, {n_tensors} tensors)")
        head = Header(version, n_tensors, n_kv)
        alignment = 32
        wanted = None if keys is None else set(keys)
        for _ in range(n_kv):
            key = r.string()
            assert key is not None
            vtype = int(r.scalar("<I"))
            head.value_offsets[key] = f.tell()
            decode = ((wanted is None and not key.startswith(skip)) or (wanted is not None and key in wanted)
                      or key == "general.alignment")
            val = r.value(vtype, decode)
            if vtype == VT.ARRAY:
                head.array_lengths[key] = r.last_count
            if decode:
                head.values[key] = val
            if key == "general.alignment" and isinstance(val, int) and val > 0:
                alignment = val
            if wanted is not None and not tensors and wanted <= head.values.keys():
                return head
        if tensors:
            for _ in range(n_tensors):
                name = r.string()
                assert name is not None
                n_dims = int(r.scalar("<I"))
                if not 1 <= n_dims <= 4:
                    raise HeaderError(f"tensor {name!r} has {n_dims} dimensions")
                ne = struct.unpack(f"<{n_dims}Q", r.read(8 * n_dims))
                ggml_type, offset = struct.unpack("<IQ", r.read(12))
                head.tensors.append(TensorEntry(name, tuple(ne), ggml_type, offset))
            end = f.tell()
            head.data_start = (end + alignment - 1) // alignment * alignment
        return head


def patch_array(path: Path, key: str, values: np.ndarray) -> None:
    """Overwrite the numeric array stored under ``key`` in place (same item type and count)."""
    head = read_header(path, {key})
    if key not in head.values:
        raise HeaderError(f"{path.name} has no key {key}")
    old = head.values[key]
    if not isinstance(old, np.ndarray) or old.shape != values.shape:
        raise HeaderError(f"{key} in {path.name} is not an array of {values.shape[0]} numbers")
    with open(path, "r+b") as f:
        f.seek(head.value_offsets[key] + 4 + 8)  # item type, count
        f.write(np.ascontiguousarray(values, dtype=old.dtype).tobytes())
