"""``struct ggml_tensor`` (ggml.h of the pinned ggml 0.25.3) and what the runtime reads or changes in it.

llama-cpp-python defines no such struct. The layout below is ggml.h's on 64-bit platforms (type@0,
ne@16, nb@48, op@80, src@152, data@248, name@256, sizeof 336); tests/native/test_tensor_layout.py
checks every field the runtime touches against the loaded ggml library's own accessors.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor { enum ggml_type type; struct ggml_backend_buffer * buffer; int64_t ne[4];
    size_t nb[4]; enum ggml_op op; int32_t op_params[16]; int32_t flags; struct ggml_tensor * src[10];
    struct ggml_tensor * view_src; size_t view_offs; void * data; char name[64]; void * extra; char padding[8]; }"""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


assert ctypes.sizeof(GgmlTensor) == 336, "ggml_tensor layout changed: dymoe-gguf needs llama-cpp-python 0.3.36"
assert GgmlTensor.data.offset == 248 and GgmlTensor.name.offset == 256 and GgmlTensor.src.offset == 152
NAME_OFFSET = GgmlTensor.name.offset
_PTR = ctypes.POINTER(GgmlTensor)


def tensor_at(ptr: int) -> GgmlTensor:
    """The ggml_tensor at address ``ptr`` (no copy: writes go to the live tensor)."""
    return ctypes.cast(ptr, _PTR).contents


def name_of(ptr: int) -> bytes:
    """A tensor's name, read straight from memory (the eval callback's hot path)."""
    return ctypes.string_at(ptr + NAME_OFFSET)


@dataclass(frozen=True)
class TensorState:
    """What a view swap changes: type, strides and data pointer (restored bit-exactly from this)."""

    type: int
    nb: tuple[int, int, int, int]
    data: int

    @classmethod
    def read(cls, t: GgmlTensor) -> TensorState:
        return cls(int(t.type), tuple(int(x) for x in t.nb), int(t.data or 0))  # type: ignore[arg-type]

    def write(self, t: GgmlTensor) -> None:
        t.type = self.type
        for i in range(GGML_MAX_DIMS):
            t.nb[i] = self.nb[i]
        t.data = self.data


def i32_matrix(ptr: int) -> np.ndarray:
    """View of a 2-D I32 tensor (e.g. ffn_moe_topk-N: ne = [k, n_tokens], rows strided by nb[1])."""
    t = tensor_at(ptr)
    k, n = int(t.ne[0]), int(t.ne[1])
    buf = (ctypes.c_char * (int(t.nb[1]) * (n - 1) + 4 * k)).from_address(int(t.data))
    return np.ndarray((n, k), dtype=np.int32, buffer=buf, strides=(int(t.nb[1]), int(t.nb[0])))


def f32_matrix(ptr: int) -> np.ndarray:
    """View of an F32 tensor as ``[rows, cols]``: ``[ne1, ne0]``, or ``[ne2, ne1]`` when ne0 == 1."""
    t = tensor_at(ptr)
    if int(t.ne[0]) == 1 and int(t.ne[1]) > 1:  # [1, k, tokens] (ffn_moe_weights): rows of k
        cols, col_stride, rows, row_stride = int(t.ne[1]), int(t.nb[1]), int(t.ne[2]), int(t.nb[2])
    else:
        cols, col_stride, rows, row_stride = int(t.ne[0]), int(t.nb[0]), int(t.ne[1]), int(t.nb[1])
    buf = (ctypes.c_char * (row_stride * (rows - 1) + col_stride * (cols - 1) + 4)).from_address(int(t.data))
    return np.ndarray((rows, cols), dtype=np.float32, buffer=buf, strides=(row_stride, col_stride))


def f32_array(ptr: int) -> np.ndarray:
    """View of an F32 tensor with numpy shape ``(ne3, ne2, ne1, ne0)`` trimmed of leading 1s."""
    t = tensor_at(ptr)
    ne = [int(x) for x in t.ne][::-1]
    nb = [int(x) for x in t.nb][::-1]
    while len(ne) > 1 and ne[0] == 1:
        ne, nb = ne[1:], nb[1:]
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
    buf = (ctypes.c_char * span).from_address(int(t.data))
    return np.ndarray(tuple(ne), dtype=np.float32, buffer=buf, strides=tuple(nb))


def f32_weight(ptr: int) -> np.ndarray:
    """Copy of a 1-D or 2-D F32 weight tensor (``[ne1, ne0]``, or ``[ne0]``); ValueError otherwise."""
    t = tensor_at(ptr)
    if t.type != 0:  # GGML_TYPE_F32
        raise ValueError("expected an F32 weight")
    ne0, ne1 = int(t.ne[0]), int(t.ne[1])
    buf = np.ctypeslib.as_array((ctypes.c_float * (ne0 * ne1)).from_address(int(t.data)))
    return np.array(buf, dtype=np.float32).reshape(ne1, ne0) if ne1 > 1 else np.array(buf, dtype=np.float32)
