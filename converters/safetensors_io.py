"""Lazy reading of (possibly sharded) safetensors checkpoints as float32 numpy arrays.

``safetensors.safe_open`` validates each file (header, offsets, size); the data itself is read
through a read-only ``numpy.memmap`` so that one tensor at a time is materialised, and bfloat16
(which safetensors' numpy backend cannot return) is widened here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dymoe_gguf.errors import SourceError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, absolute byte offset, dtype name, shape."""

    file: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_DTYPES[self.dtype]).itemsize


def _read_header(path: Path) -> dict:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy"):
            pass  # validation only: raises on truncated or malformed files
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"Corrupt or truncated safetensors file {path.name}: {first}") from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)) | {"__data_start__": 8 + n}


def index_safetensors(files: list[Path]) -> dict[str, TensorRef]:
    """Map every tensor name in ``files`` to a :class:`TensorRef`."""
    refs: dict[str, TensorRef] = {}
    for path in files:
        header = _read_header(path)
        start = header.pop("__data_start__")
        header.pop("__metadata__", None)
        size = path.stat().st_size
        for name, info in header.items():
            dtype = info["dtype"]
            if dtype not in _DTYPES:
                raise SourceError(f"Unsupported dtype {dtype} for tensor {name} in {path.name}")
            begin, end = info["data_offsets"]
            if start + end > size:
                raise SourceError(f"Corrupt or truncated safetensors file {path.name}: "
                                  f"tensor {name} ends past the end of the file")
            refs[name] = TensorRef(path, start + begin, dtype, tuple(info["shape"]))
    return refs


def load_f32(ref: TensorRef) -> np.ndarray:
    """Read one tensor as a float32 array (a fresh array, not a view of the file)."""
    count = int(np.prod(ref.shape, dtype=np.int64))
    raw = np.memmap(ref.file, dtype=_DTYPES[ref.dtype], mode="r", offset=ref.offset, shape=(count,))
    if ref.dtype == "BF16":
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = np.asarray(raw, dtype=np.float32).copy() if raw.dtype == np.float32 else raw.astype(np.float32)
    del raw
    return out.reshape(ref.shape)
