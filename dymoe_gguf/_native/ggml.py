"""ggml's own quantizers, from the libggml-base that llama-cpp-python ships.

Each binding is preceded by its C declaration (ggml.h of the vendored ggml).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from dymoe_gguf.bundle.format import row_bytes
from dymoe_gguf.errors import NativeLibraryError


def lib_dir() -> Path:
    """The ``lib/`` folder of the installed llama_cpp package (without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise NativeLibraryError("llama-cpp-python is not installed: run the set-up command in README.md")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _open(stem: str) -> ctypes.CDLL:
    # Prefer the soname file (libX.so.0): libllama loads that one, and dlopen of the same path
    # returns the same handle, so ggml state is never duplicated.
    d = lib_dir()
    for name in (f"{stem}.so.0", f"{stem}.so", f"{stem}.dylib", f"{stem}.0.dylib"):
        if (d / name).exists():
            return ctypes.CDLL(str(d / name), mode=os.RTLD_GLOBAL if hasattr(os, "RTLD_GLOBAL") else 0)
    raise NativeLibraryError(f"{stem} not found in {d}: reinstall with the set-up command in README.md")


@functools.cache
def base() -> ctypes.CDLL:
    """libggml-base with the quantization entry points typed."""
    lib = _open("libggml-base")
    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
    #                            int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    # void ggml_quantize_init(enum ggml_type type);
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    # bool ggml_quantize_requires_imatrix(enum ggml_type type);
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


@functools.cache
def _init(qtype: int) -> None:
    base().ggml_quantize_init(qtype)


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a 2-D float32 array row-wise; returns the raw bytes as a uint8 array.

    Releases the GIL for the duration of the C call (ctypes does), so threads run in parallel.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    nrows, n_per_row = x.shape
    if qtype == GGMLQuantizationType.F32:
        return x.view(np.uint8).reshape(-1).copy()
    out = np.empty(nrows * row_bytes(qtype, n_per_row), dtype=np.uint8)
    lib = base()
    _init(int(qtype))
    imp = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"Expected an importance vector of {n_per_row} values, got {imatrix.shape}")
        imp = imatrix.ctypes.data
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} requires an importance matrix")
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, imp)
    if written != out.nbytes:
        raise NativeLibraryError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out
