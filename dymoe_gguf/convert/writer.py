"""Streaming GGUF output with per-tensor checksums.

gguf's ``GGUFWriter`` writes the header, metadata and tensor table (it computes every offset from
the sizes in the plan); tensor data is then appended piece by piece — one expert at a time — with
the same alignment padding ``GGUFWriter.write_tensor_data`` would add, so memory stays bounded.
Each tensor's bytes are hashed as they stream past (xxh3, 15 GB/s here) and the checksum array,
written as zeros near the start of the header, is filled in place before the file is closed.

:func:`file_bytes` gives a file's exact size before anything is written: the free-space check and
``--dry-run`` use it. The output directory itself (locking, replacing, leftovers) is
:mod:`dymoe_gguf.convert.output`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import xxhash
from gguf import GGUFValueType as VT

from dymoe_gguf.bundle.format import CHECKSUM_ALGO, Key, aligned
from dymoe_gguf.bundle.header import patch_array
from dymoe_gguf.convert.output import atomic_dir, check_output
from dymoe_gguf.convert.plan import FilePlan

_FIXED = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4, VT.FLOAT32: 4,
          VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}


def prepare(arch: str, plan: FilePlan, alignment: int, metadata: Callable[[gguf.GGUFWriter], None]) -> gguf.GGUFWriter:
    """A writer holding ``plan``'s metadata and tensor table, not yet bound to a file."""
    w = gguf.GGUFWriter(None, arch)
    w.add_custom_alignment(alignment)
    # Early in the header, so that the checksums are found (and patched) without scanning the vocabulary.
    w.add_string(Key.CHECKSUM_ALGO, CHECKSUM_ALGO)
    w.add_key_value(Key.CHECKSUMS, [0] * len(plan.tensors), VT.ARRAY, sub_type=VT.UINT64)
    metadata(w)
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    return w


def _value_bytes(val: Any, vtype: VT, sub_type: VT | None = None) -> int:
    """Bytes ``GGUFWriter`` packs for one value (without its type tag)."""
    if vtype in _FIXED:
        return _FIXED[vtype]
    if vtype == VT.STRING:
        return 8 + len(val.encode("utf-8") if isinstance(val, str) else val)
    if vtype == VT.ARRAY:
        items = list(val)
        ltype = sub_type or (VT.UINT8 if isinstance(val, bytes) else VT.get_type(items[0]))
        if ltype in _FIXED:
            return 4 + 8 + len(items) * _FIXED[ltype]
        return 4 + 8 + sum(_value_bytes(x, ltype) for x in items)
    raise ValueError(f"Unknown GGUF value type {vtype}")


def file_bytes(w: gguf.GGUFWriter) -> int:
    """Exact size of the file ``w`` will write: header, metadata, tensor table, aligned data."""
    n = 4 + 4 + 8 + 8  # magic, version, tensor count, key count
    for key, v in w.kv_data[0].items():
        n += _value_bytes(key, VT.STRING) + 4 + _value_bytes(v.value, v.type, v.sub_type)
    data = 0
    for name, ti in w.tensors[0].items():
        n += _value_bytes(name, VT.STRING) + 4 + 8 * len(ti.shape) + 4 + 8
        data += aligned(ti.nbytes, w.data_alignment)
    return aligned(n, w.data_alignment) + data


class GGUFStream:
    """One output GGUF whose tensor table is fixed up front and whose data arrives in order.

    File system errors propagate as ``OSError``; the caller names the output in its message.
    """

    def __init__(self, path: Path, writer: gguf.GGUFWriter, plan: FilePlan) -> None:
        self.path = path
        self.plan = plan
        self._w = writer
        self._sums = np.zeros(len(plan.tensors), dtype=np.uint64)
        self._hash = xxhash.xxh3_64()
        self._w.write_header_to_file(path)
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()
        assert self._w.fout is not None
        self._f = self._w.fout[0]
        self._next = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far

    def write(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor (a whole tensor or the next piece of it)."""
        t = self.plan.tensors[self._next]
        raw = data.view(np.uint8).reshape(-1)
        if self._written + raw.nbytes > t.nbytes:
            raise AssertionError(f"Expected {t.nbytes} bytes for {t.name}, got more")
        if self._written == 0:
            self._w.write_padding(self._f, self._f.tell())
        self._f.write(memoryview(raw))  # an OSError with its errno (ENOSPC...), unlike tofile's short write
        self._hash.update(raw)
        self._written += raw.nbytes
        if self._written == t.nbytes:
            self._w.write_padding(self._f, t.nbytes)
            self._sums[self._next] = self._hash.intdigest()
            self._hash.reset()
            self._next += 1
            self._written = 0

    def close(self) -> None:
        """Fill in the checksums, flush, fsync and close; checks that every planned tensor was written."""
        if self._next != len(self.plan.tensors):
            raise AssertionError(f"{self.path.name}: wrote {self._next} of {len(self.plan.tensors)} tensors")
        self._f.flush()
        patch_array(self.path, Key.CHECKSUMS, self._sums)
        os.fsync(self._f.fileno())
        self._w.close()

    def abort(self) -> None:
        """Close without finishing (the partial directory is removed by the caller)."""
        try:
            self._w.close()
        except OSError:
            pass


__all__ = ["GGUFStream", "atomic_dir", "check_output", "file_bytes", "prepare"]
