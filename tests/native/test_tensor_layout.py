"""dymoe_gguf._native.tensor's ``struct ggml_tensor`` against the ggml library llama-cpp-python loaded.

Tensors are made by ggml itself (``ggml_new_tensor_3d``, ``ggml_add``, ``ggml_view_1d``…) and every
field the runtime reads or writes is compared with what ggml's own accessors return, so a layout
that drifts from the built library (another ggml version) fails here, not as a crash at run time.
"""

from __future__ import annotations

import ctypes

import pytest

pytest.importorskip("llama_cpp")

from dymoe_gguf._native.tensor import GgmlTensor, TensorState, name_of, tensor_at  # noqa: E402

GGML_TYPE_F32, GGML_TYPE_Q4_K = 0, 12
GGML_OP_ADD = 2


class _InitParams(ctypes.Structure):
    """struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; }"""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@pytest.fixture(scope="module")
def ggml():
    import os

    import llama_cpp  # noqa: F401 - loads libggml-base

    from dymoe_gguf._native.ggml import lib_dir

    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so.0"), mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_GLOBAL)
    sig = {
        "ggml_init": ([_InitParams], ctypes.c_void_p),
        "ggml_free": ([ctypes.c_void_p], None),
        "ggml_new_tensor_3d": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64],
                               ctypes.c_void_p),
        "ggml_new_tensor_1d": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_int64], ctypes.c_void_p),
        "ggml_add": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_void_p),
        "ggml_view_1d": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t], ctypes.c_void_p),
        "ggml_set_name": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        "ggml_get_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_get_data": ([ctypes.c_void_p], ctypes.c_void_p),
        "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t),
        "ggml_row_size": ([ctypes.c_int, ctypes.c_int64], ctypes.c_size_t),
        "ggml_type_size": ([ctypes.c_int], ctypes.c_size_t),
        "ggml_n_dims": ([ctypes.c_void_p], ctypes.c_int),
        "ggml_tensor_overhead": ([], ctypes.c_size_t),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@pytest.fixture
def ctx(ggml):
    c = ggml.ggml_init(_InitParams(16 << 20, None, False))
    assert c
    yield c
    ggml.ggml_free(c)


def test_struct_size_matches_the_library(ggml, ctx):
    # consecutive tensors of one context sit one (ggml_object + ggml_tensor) apart when no data
    # is allocated in between: the stride minus the object header (32 bytes on 64-bit) is sizeof
    lib_ctx = ggml.ggml_init(_InitParams(1 << 20, None, True))
    try:
        a = ggml.ggml_new_tensor_1d(lib_ctx, GGML_TYPE_F32, 4)
        b = ggml.ggml_new_tensor_1d(lib_ctx, GGML_TYPE_F32, 4)
        assert b - a == ggml.ggml_tensor_overhead()
        assert ggml.ggml_tensor_overhead() - 32 == ctypes.sizeof(GgmlTensor)
    finally:
        ggml.ggml_free(lib_ctx)


def test_fields_read_as_the_library_reads_them(ggml, ctx):
    t = ggml.ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_K, 512, 6, 3)
    ggml.ggml_set_name(t, b"blk.7.ffn_up_exps.weight")
    s = tensor_at(t)
    assert s.type == GGML_TYPE_Q4_K
    assert [int(x) for x in s.ne] == [512, 6, 3, 1] and ggml.ggml_n_dims(t) == 3
    row = ggml.ggml_row_size(GGML_TYPE_Q4_K, 512)
    assert [int(x) for x in s.nb] == [ggml.ggml_type_size(GGML_TYPE_Q4_K), row, row * 6, row * 18]
    assert int(s.nb[3]) == ggml.ggml_nbytes(t)
    assert int(s.data) == ggml.ggml_get_data(t)
    assert name_of(t) == ggml.ggml_get_name(t) == b"blk.7.ffn_up_exps.weight"
    assert not s.extra and not s.view_src

    x = ggml.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 8)
    y = ggml.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 8)
    z = tensor_at(ggml.ggml_add(ctx, x, y))
    assert z.op == GGML_OP_ADD and int(z.src[0]) == x and int(z.src[1]) == y and not z.src[2]

    v = tensor_at(ggml.ggml_view_1d(ctx, x, 4, 8))
    assert int(v.view_src) == x and int(v.view_offs) == 8
    assert int(v.data) == ggml.ggml_get_data(x) + 8


def test_a_state_written_is_what_the_library_sees(ggml, ctx):
    t = ggml.ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_K, 256, 4, 2)
    other = ggml.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 256, 4, 2)
    before = TensorState.read(tensor_at(t))
    TensorState.read(tensor_at(other)).write(tensor_at(t))  # what a view swap does
    assert ggml.ggml_get_data(t) == ggml.ggml_get_data(other)
    assert ggml.ggml_nbytes(t) == ggml.ggml_nbytes(other)  # type and strides moved with it
    before.write(tensor_at(t))
    assert TensorState.read(tensor_at(t)) == before and ggml.ggml_nbytes(t) == ggml.ggml_row_size(12, 256) * 8
