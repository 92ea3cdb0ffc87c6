"""ctypes helpers for the native patch tests (test-only).

The product's own ctypes module lives elsewhere; this file only serves tests/native/.

Everything here binds the copies of libggml-base / libggml-cpu that llama_cpp (libllama) already
loaded: the wheel ships ``libggml-cpu.so`` and ``libggml-cpu.so.0`` as separate files, and opening
the other name loads a second copy with its own (empty) view table.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

# enum ggml_type (ggml.h)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8
GGML_TYPE_Q2_K = 10
GGML_TYPE_Q3_K = 11
GGML_TYPE_Q4_K = 12
GGML_TYPE_Q5_K = 13
GGML_TYPE_Q6_K = 14

TYPE_NAMES = {
    GGML_TYPE_F32: "F32",
    GGML_TYPE_Q8_0: "Q8_0",
    GGML_TYPE_Q2_K: "Q2_K",
    GGML_TYPE_Q3_K: "Q3_K",
    GGML_TYPE_Q4_K: "Q4_K",
    GGML_TYPE_Q5_K: "Q5_K",
    GGML_TYPE_Q6_K: "Q6_K",
}

# struct ggml_tensor layout (ggml.h of the pinned version, sizeof 336)
OFF_TYPE = 0
OFF_EXTRA_BUFFER = 8
OFF_NE = 16
OFF_NB = 48
OFF_OP = 80
OFF_SRC = 152
OFF_DATA = 248
OFF_NAME = 256
OFF_EXTRA = 320
GGML_MAX_NAME = 64


# --------------------------------------------------------------------------------------------
# loaded libraries
# --------------------------------------------------------------------------------------------

def _loaded_path(prefix: str) -> str | None:
    """Full path of the first mapped shared object whose file name starts with ``prefix``."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and os.path.basename(parts[-1]).startswith(prefix):
                    return parts[-1]
    except OSError:
        pass
    return None


def _bind_loaded(prefix: str, soname: str) -> ctypes.CDLL:
    import llama_cpp  # noqa: F401  (loads libllama and with it libggml-base/libggml-cpu)

    noload = getattr(os, "RTLD_NOLOAD", 0)
    path = _loaded_path(prefix)
    if path is not None:
        return ctypes.CDLL(path, mode=noload | os.RTLD_GLOBAL)
    return ctypes.CDLL(soname, mode=noload | os.RTLD_GLOBAL)


_base: ctypes.CDLL | None = None
_cpu: ctypes.CDLL | None = None


def ggml_base() -> ctypes.CDLL:
    global _base
    if _base is None:
        lib = _bind_loaded("libggml-base", "libggml-base.so.0")
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _base = lib
    return _base


def ggml_cpu() -> ctypes.CDLL:
    global _cpu
    if _cpu is None:
        _cpu = _bind_loaded("libggml-cpu", "libggml-cpu.so.0")
    return _cpu


def patch_api() -> ctypes.CDLL | None:
    """The loaded libggml-cpu with the dymoe functions typed, or None on a stock build."""
    lib = ggml_cpu()
    if not hasattr(lib, "dymoe_patch_version"):
        return None
    lib.dymoe_patch_version.restype = ctypes.c_int
    lib.dymoe_patch_version.argtypes = []
    lib.dymoe_expert_view_set.restype = ctypes.c_int
    lib.dymoe_expert_view_set.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int,
                                          ctypes.c_void_p, ctypes.c_size_t]
    lib.dymoe_expert_view_clear.restype = ctypes.c_int
    lib.dymoe_expert_view_clear.argtypes = [ctypes.c_void_p]
    lib.dymoe_expert_view_clear_all.restype = None
    lib.dymoe_expert_view_clear_all.argtypes = []
    lib.dymoe_expert_view_count.restype = ctypes.c_int
    lib.dymoe_expert_view_count.argtypes = []
    return lib


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------

def row_size(gtype: int, n: int) -> int:
    return int(ggml_base().ggml_row_size(gtype, n))


def quantize(gtype: int, x: np.ndarray) -> np.ndarray:
    """Quantize f32 ``x`` (..., n_per_row) to ``gtype``; returns uint8 (..., row_size)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1]
    nrows = int(np.prod(x.shape[:-1]))
    rs = row_size(gtype, n_per_row)
    out = np.zeros(x.shape[:-1] + (rs,), dtype=np.uint8)
    n = ggml_base().ggml_quantize_chunk(gtype, x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
    assert n == nrows * rs, (n, nrows, rs)
    return out


# --------------------------------------------------------------------------------------------
# struct ggml_tensor access
# --------------------------------------------------------------------------------------------

def t_name(t: int) -> str:
    return ctypes.string_at(t + OFF_NAME, GGML_MAX_NAME).split(b"\0", 1)[0].decode()


def t_type(t: int) -> int:
    return ctypes.c_int.from_address(t + OFF_TYPE).value


def t_ne(t: int) -> tuple[int, int, int, int]:
    return tuple((ctypes.c_int64 * 4).from_address(t + OFF_NE))


def t_nb(t: int) -> tuple[int, int, int, int]:
    return tuple((ctypes.c_size_t * 4).from_address(t + OFF_NB))


def t_data(t: int) -> int:
    return ctypes.c_void_p.from_address(t + OFF_DATA).value or 0


def t_src(t: int, i: int) -> int:
    return ctypes.c_void_p.from_address(t + OFF_SRC + 8 * i).value or 0


def t_extra(t: int) -> int:
    return ctypes.c_void_p.from_address(t + OFF_EXTRA).value or 0


def read_f32(t: int) -> np.ndarray:
    """Copy of a contiguous F32 tensor, numpy shape reversed from ne."""
    ne = t_ne(t)
    assert t_type(t) == GGML_TYPE_F32
    n = ne[0] * ne[1] * ne[2] * ne[3]
    buf = (ctypes.c_float * n).from_address(t_data(t))
    return np.ctypeslib.as_array(buf).copy().reshape(ne[3], ne[2], ne[1], ne[0])


def read_i32_2d(t: int) -> np.ndarray:
    """Copy of a (possibly non-contiguous) 2-D I32 tensor as [ne1, ne0]."""
    ne, nb = t_ne(t), t_nb(t)
    base = t_data(t)
    out = np.empty((ne[1], ne[0]), dtype=np.int32)
    for i1 in range(ne[1]):
        for i0 in range(ne[0]):
            out[i1, i0] = ctypes.c_int32.from_address(base + i1 * nb[1] + i0 * nb[0]).value
    return out


class TensorSwap:
    """Whole-tensor view swap (type, nb, data) of a weight tensor, restorable bit-exactly."""

    def __init__(self, t: int):
        self.t = t
        self.saved = (t_type(t), t_nb(t), t_data(t))

    def swap(self, gtype: int, data: np.ndarray) -> None:
        ne = t_ne(self.t)
        rs = row_size(gtype, ne[0])
        nb = (ctypes.c_size_t * 4).from_address(self.t + OFF_NB)
        assert data.nbytes >= rs * ne[1] * ne[2]
        ctypes.c_int.from_address(self.t + OFF_TYPE).value = gtype
        nb[0] = rs // (ne[0] // _blck(gtype))
        nb[1] = rs
        nb[2] = rs * ne[1]
        nb[3] = rs * ne[1] * ne[2]
        ctypes.c_void_p.from_address(self.t + OFF_DATA).value = data.ctypes.data

    def restore(self) -> None:
        gtype, nbs, data = self.saved
        ctypes.c_int.from_address(self.t + OFF_TYPE).value = gtype
        nb = (ctypes.c_size_t * 4).from_address(self.t + OFF_NB)
        for i in range(4):
            nb[i] = nbs[i]
        ctypes.c_void_p.from_address(self.t + OFF_DATA).value = data


def _blck(gtype: int) -> int:
    return {GGML_TYPE_F32: 1, GGML_TYPE_F16: 1, GGML_TYPE_Q8_0: 32}.get(gtype, 256)


# --------------------------------------------------------------------------------------------
# a tiny MoE GGUF (qwen3moe, random weights, no tokenizer)
# --------------------------------------------------------------------------------------------

def write_tiny_moe(path: str, *, n_layer: int = 2, n_embd: int = 256, n_ff_exp: int = 256,
                   n_expert: int = 8, n_expert_used: int = 2, n_vocab: int = 256, n_head: int = 4,
                   expert_type: int = GGML_TYPE_Q8_0, seed: int = 0,
                   keep: dict[str, np.ndarray] | None = None) -> None:
    """Write a qwen3moe GGUF with random weights; expert tensors quantized to ``expert_type``.

    If ``keep`` is a dict, the f32 values of every expert tensor are stored in it by tensor name.
    """
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    def rnd(*shape, scale=None):
        s = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape, dtype=np.float32) * s).astype(np.float32)

    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff_exp * n_expert_used)
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_expert_used)
    w.add_tokenizer_model("none")
    w.add_vocab_size(n_vocab)

    w.add_tensor("token_embd.weight", rnd(n_vocab, n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", rnd(n_vocab, n_embd))
    qtype = gguf.GGMLQuantizationType(expert_type)
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rnd(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_k.weight", rnd(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", rnd(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", rnd(n_embd, n_head * head_dim))
        w.add_tensor(p + "attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
        w.add_tensor(p + "attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate_inp.weight", rnd(n_expert, n_embd, scale=1.0))
        for name, shape in (("ffn_gate_exps", (n_expert, n_ff_exp, n_embd)),
                            ("ffn_up_exps", (n_expert, n_ff_exp, n_embd)),
                            ("ffn_down_exps", (n_expert, n_embd, n_ff_exp))):
            x = rnd(*shape)
            if keep is not None:
                keep[p + name + ".weight"] = x
            if expert_type == GGML_TYPE_F32:
                w.add_tensor(p + name + ".weight", x)
            else:
                w.add_tensor(p + name + ".weight", quantize(expert_type, x), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------------------------
# a model + context through llama_cpp's low-level API
# --------------------------------------------------------------------------------------------

_BACKEND = False


class Runner:
    """A model + context through llama_cpp's low-level API, observing layer 0's MoE nodes."""

    WATCH = ("ffn_moe_topk-0", "ffn_moe_down-0")

    def __init__(self, path: str, n_threads: int, prompt, next_token: int, n_vocab: int):
        import llama_cpp

        global _BACKEND
        if not _BACKEND:
            llama_cpp.llama_backend_init()
            _BACKEND = True
        self.llama_cpp = llama_cpp
        self.prompt = list(prompt)
        self.next_token = int(next_token)
        self.n_vocab = int(n_vocab)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_mmap = True
        mp.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        assert self.model, "model failed to load"
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = 128
        cp.n_batch = 64
        cp.n_ubatch = 64
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
        cp.cb_eval = self._cb
        cp.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        assert self.ctx, "context failed to initialize"
        self.weights = {}      # weight tensor name -> address
        self.captured = {}     # node name -> numpy copy
        self.on_topk = None    # called with ask=false on ffn_moe_topk-0
        self.error = None

    def _on_eval(self, t, ask, _ud):
        try:
            name = t_name(t)
            if ask:
                for i in (0, 1):
                    s = t_src(t, i)
                    if s:
                        sn = t_name(s)
                        if sn.startswith("blk.") and sn.endswith(".weight"):
                            self.weights[sn] = s
                return name in self.WATCH
            if name == "ffn_moe_topk-0":
                self.captured[name] = read_i32_2d(t)
                if self.on_topk is not None:
                    self.on_topk(self)
            elif name == "ffn_moe_down-0":
                self.captured[name] = read_f32(t)[0]   # [n_tokens, n_used, n_embd]
        except Exception as e:  # noqa: BLE001 - never let an exception cross the C boundary
            self.error = e
        return True

    def _decode(self, tokens):
        llama_cpp = self.llama_cpp
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        batch = llama_cpp.llama_batch_get_one(arr, len(tokens))
        rc = llama_cpp.llama_decode(self.ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
        if self.error is not None:
            raise self.error
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def run(self):
        """Prompt batch then one decoded token from an empty cache; layer-0 captures of each."""
        llama_cpp = self.llama_cpp
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.captured = {}
        lp = self._decode(self.prompt)
        prompt = dict(self.captured, logits=lp)
        self.captured = {}
        ld = self._decode([self.next_token])
        decode = dict(self.captured, logits=ld)
        return {"prompt": prompt, "decode": decode}

    def weight(self, name: str) -> int:
        if name not in self.weights:
            self.run()
        return self.weights[name]

    def close(self):
        llama_cpp = self.llama_cpp
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
