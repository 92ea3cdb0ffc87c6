"""The C hot path of patched builds (patches/0003), bound through ctypes.

From libggml-cpu (ggml-cpu.h, ``DYMOE_PATCH_VERSION >= 2``)::

    struct dymoe_layer_hook { struct dymoe_hot * state; int32_t layer, n_expert; const uint8_t * ready;
                              const float * router; int32_t renorm, next; const float * next_router;
                              int32_t n_next; const uint8_t * next_ready; const uint8_t * prefetch;
                              uint8_t * in_use; };
    typedef void (*dymoe_miss_fn)(int32_t layer, int32_t n, const int32_t * experts);
    struct dymoe_eval_forward { ggml_backend_sched_eval_callback fn; void * user_data; };
    struct dymoe_hot * dymoe_hot_new(int32_t k, int32_t cap, int32_t * log_layer, int32_t * log_ids,
                                     float * log_w, int32_t n_layers, int64_t * counters, int32_t * current,
                                     dymoe_miss_fn on_miss, int wake_fd, int32_t * requests, int32_t request_cap);
    void    dymoe_hot_free(struct dymoe_hot * hs);
    int     dymoe_hook_set(const struct ggml_tensor * w, const struct dymoe_layer_hook * hook);
    int     dymoe_expert_view_reserve(const struct ggml_tensor * w, uint64_t type_mask);
    int32_t dymoe_hot_log_take(struct dymoe_hot * hs);
    int32_t dymoe_hot_requests(struct dymoe_hot * hs, int32_t * out, int32_t max);
    void    dymoe_hot_times(const struct dymoe_hot * hs, int64_t * out3);
    bool    dymoe_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

All memory handed to C (flags, routers, the log, counters, the hook structs) is owned by
:class:`HotPath` and must outlive the hooks: :meth:`HotPath.clear` before it is freed.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from dymoe_gguf.errors import NativeLibraryError

HOT_VERSION = 2  # the patch version that has the hot path
N_COUNTERS = 5  # DYMOE_HOT_NC: uses, misses, prediction hits, selections scored, predicted
MissFn = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32))


class LayerHook(ctypes.Structure):
    """struct dymoe_layer_hook"""

    _fields_ = [("state", ctypes.c_void_p), ("layer", ctypes.c_int32), ("n_expert", ctypes.c_int32),
                ("ready", ctypes.c_void_p),
                ("router", ctypes.c_void_p), ("renorm", ctypes.c_int32), ("next", ctypes.c_int32),
                ("next_router", ctypes.c_void_p), ("n_next", ctypes.c_int32), ("next_ready", ctypes.c_void_p),
                ("prefetch", ctypes.c_void_p), ("in_use", ctypes.c_void_p)]


class EvalForward(ctypes.Structure):
    """struct dymoe_eval_forward: what dymoe_eval_callback forwards to (fn NULL: ask for nothing)."""

    _fields_ = [("fn", ctypes.c_void_p), ("user_data", ctypes.c_void_p)]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _bind(lib: ctypes.CDLL) -> None:
    i32p, f32p, i64p = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
    lib.dymoe_hot_new.argtypes = [ctypes.c_int32, ctypes.c_int32, i32p, i32p, f32p, ctypes.c_int32, i64p, i32p,
                                  MissFn, ctypes.c_int, i32p, ctypes.c_int32]
    lib.dymoe_hot_new.restype = ctypes.c_void_p
    lib.dymoe_hot_free.argtypes = [ctypes.c_void_p]
    lib.dymoe_hot_free.restype = None
    lib.dymoe_hook_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.dymoe_hook_set.restype = ctypes.c_int
    lib.dymoe_expert_view_reserve.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.dymoe_expert_view_reserve.restype = ctypes.c_int
    lib.dymoe_hot_log_take.argtypes = [ctypes.c_void_p]
    lib.dymoe_hot_log_take.restype = ctypes.c_int32
    lib.dymoe_hot_requests.argtypes = [ctypes.c_void_p, i32p, ctypes.c_int32]
    lib.dymoe_hot_requests.restype = ctypes.c_int32
    lib.dymoe_hot_times.argtypes = [ctypes.c_void_p, i64p]
    lib.dymoe_hot_times.restype = None


class HotPath:
    """The hooks of one model: the arrays C reads and writes, and the calls that register them."""

    def __init__(self, lib: ctypes.CDLL, n_layers: int, k: int, log_rows: int,
                 on_miss: Callable[[int, np.ndarray], None], wake_fd: int, request_cap: int = 4096) -> None:
        _bind(lib)
        self.lib = lib
        self.k = k
        self.log_layer = np.zeros(log_rows, dtype=np.int32)
        self.log_ids = np.zeros((log_rows, k), dtype=np.int32)
        self.log_w = np.zeros((log_rows, k), dtype=np.float32)
        self.counters = np.zeros((N_COUNTERS, n_layers), dtype=np.int64)
        self.current = np.full(1, -1, dtype=np.int32)  # the layer whose hook ran last
        self.in_use = np.zeros((n_layers, 0), dtype=np.uint8)  # sized by the first hook
        self.requests = np.zeros((request_cap, 2), dtype=np.int32)
        self._out = np.zeros((request_cap, 2), dtype=np.int32)
        self._times = np.zeros(3, dtype=np.int64)
        self._keep: list[Any] = []  # arrays and structs C points into
        self._hooked: list[int] = []
        self._reserved: list[int] = []

        def miss(layer: int, n: int, experts: Any) -> None:
            on_miss(layer, np.ctypeslib.as_array(experts, shape=(n,)).copy())

        self._miss = MissFn(miss)
        i32, f32, i64 = ctypes.c_int32, ctypes.c_float, ctypes.c_int64
        self.state = lib.dymoe_hot_new(k, log_rows, self._p(self.log_layer, i32), self._p(self.log_ids, i32),
                                       self._p(self.log_w, f32), n_layers, self._p(self.counters, i64),
                                       self._p(self.current, i32), self._miss, wake_fd, self._p(self.requests, i32),
                                       request_cap)
        if not self.state:
            raise NativeLibraryError(f"dymoe_hot_new failed: k={k}, layers={n_layers}")

    @staticmethod
    def _p(a: np.ndarray, ctype: Any) -> Any:
        return a.ctypes.data_as(ctypes.POINTER(ctype))

    def hook(self, tensor: int, *, layer: int, ready: np.ndarray, router_ptr: int | None, renorm: bool,
             next_layer: int = -1, next_router: np.ndarray | None = None, next_ready: np.ndarray | None = None,
             prefetch: np.ndarray | None = None) -> None:
        """Run the hook for MoE layer ``layer`` at ``tensor`` (its first expert weight)."""
        n_next = 0 if next_router is None else len(next_router)
        if self.in_use.shape[1] < len(ready):
            self.in_use = np.zeros((len(self.counters[0]), len(ready)), dtype=np.uint8)
        h = LayerHook(self.state, layer, len(ready), _ptr(ready), router_ptr, int(renorm), next_layer,
                      _ptr(next_router), n_next, _ptr(next_ready), _ptr(prefetch), _ptr(self.in_use[layer]))
        self._keep += [h, ready, next_router, next_ready, prefetch]
        rc = self.lib.dymoe_hook_set(tensor, ctypes.addressof(h))
        if rc != 0:
            raise NativeLibraryError(f"dymoe_hook_set failed ({rc}) for layer {layer}")
        self._hooked.append(tensor)

    def reserve(self, tensor: int, ggml_types: list[int]) -> None:
        """Let views of ``tensor`` switch among ``ggml_types`` inside a compute (work buffers sized for them)."""
        rc = self.lib.dymoe_expert_view_reserve(tensor, sum(1 << int(t) for t in set(ggml_types)))
        if rc != 0:
            raise NativeLibraryError(f"dymoe_expert_view_reserve failed ({rc})")
        self._reserved.append(tensor)

    def reading(self) -> tuple[int, np.ndarray] | None:
        """(layer, experts) the layer being computed reads, as its hook published them, or None."""
        layer = int(self.current[0])
        return None if layer < 0 else (layer, np.flatnonzero(self.in_use[layer]))

    def take_log(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Rows logged since the last take: (layer [n], ids [n, k], weights [n, k]) and rows dropped."""
        n = int(self.lib.dymoe_hot_log_take(self.state))
        m = min(n, len(self.log_layer))
        return self.log_layer[:m].copy(), self.log_ids[:m].copy(), self.log_w[:m].copy(), n - m

    def take_requests(self) -> np.ndarray:
        """Prefetch requests (layer, expert) queued by the hooks (any thread)."""
        n = int(self.lib.dymoe_hot_requests(self.state, self._p(self._out, ctypes.c_int32), len(self._out)))
        return self._out[:n].copy()

    def times(self) -> tuple[int, float, float]:
        """Hook calls, seconds in hooks (without on_miss), seconds in on_miss."""
        self.lib.dymoe_hot_times(self.state, self._p(self._times, ctypes.c_int64))
        return int(self._times[0]), self._times[1] / 1e9, self._times[2] / 1e9

    def clear(self) -> None:
        """Unregister every hook and reservation (before the model or these arrays are freed)."""
        for t in self._hooked:
            self.lib.dymoe_hook_set(t, None)
        for t in self._reserved:
            self.lib.dymoe_expert_view_reserve(t, 0)
        self._hooked.clear()
        self._reserved.clear()
        if self.state:
            self.lib.dymoe_hot_free(self.state)
            self.state = None


def forwarding_callback(lib: ctypes.CDLL, python_callback: Any) -> tuple[Any, EvalForward]:
    """The patch's C eval callback and its user data, forwarding to ``python_callback`` (a callback
    object) until ``forward.fn`` is set to None: then it asks for no node, and costs no Python."""
    from llama_cpp import llama_cpp as low

    forward = EvalForward(ctypes.cast(python_callback, ctypes.c_void_p).value, None)
    return ctypes.cast(lib.dymoe_eval_callback, low.ggml_backend_sched_eval_callback), forward


def forward_again(forward: EvalForward, python_callback: Any) -> None:
    """The C eval callback forwards to ``python_callback`` again (the Python safe point is back)."""
    forward.fn = ctypes.cast(python_callback, ctypes.c_void_p).value
