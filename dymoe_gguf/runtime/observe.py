"""Observe: llama.cpp's eval callback, reduced to what the controller needs.

The scheduler calls the callback with ``ask=True`` for every node of the graph; answering True for a
node makes it compute up to that node and call back with ``ask=False`` before going on. Every asked
node splits the graph (another compute launch), so we ask for one node per MoE layer N:

* ``ffn_moe_topk-N``   selected experts ``I32 [k, n_tokens]`` — called back *before* the layer's expert
  matmuls, the safe point to swap views or rewrite ids,
* (``ffn_moe_weights-N`` only when skipping, to zero the weights of dropped slots).

Nodes computed earlier in the same split whose buffers are still alive at that point — the router
softmax ``ffn_moe_probs-N`` (read again by get_rows after top-k) and the FFN input ``ffn_inp-N``
(read again by the residual add) — are *peeked*: their addresses are noted during the ask pass and
their data read at the top-k callback, without a split of their own.

The first graph is also used to discover the weight tensors (``src[0]`` of the MUL_MAT_ID nodes
``ffn_moe_{gate,up,down}-N``, the router ``src[0]`` of ``ffn_moe_logits-N`` and the FFN norm weight
of ``ffn_norm-N``). Names, not addresses, identify nodes: graphs are rebuilt and addresses recycled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dymoe_gguf._native.tensor import f32_matrix, i32_matrix, name_of, tensor_at

GGML_OP_MUL = 7  # enum ggml_op in ggml.h (NONE, DUP, ADD, ADD_ID, ADD1, ACC, SUB, MUL, ...)


@dataclass
class Discovered:
    """Weight tensors found in the graph: (layer, matrix) -> ggml_tensor address, etc."""

    experts: dict[tuple[int, str], int] = field(default_factory=dict)
    routers: dict[int, int] = field(default_factory=dict)  # layer -> ffn_gate_inp tensor
    ffn_norms: dict[int, int] = field(default_factory=dict)  # layer -> ffn_norm weight tensor


# handler(layer, ptr) for the computed node
Handler = Callable[[int, int], None]


class Observer:
    """The callback object; ``handlers`` maps node kind -> function called with (layer, tensor address)."""

    def __init__(self, moe_layers: tuple[int, ...], *, on_topk: Handler | None, on_weights: Handler | None = None,
                 peek: tuple[str, ...] = ("ffn_moe_probs", "ffn_inp"), extra: dict[str, Handler] | None = None) -> None:
        self.discovered = Discovered()
        self._want: dict[bytes, tuple[Handler, int]] = {}
        self._peek: dict[bytes, tuple[str, int]] = {}
        self.peeked: dict[tuple[str, int], int] = {}  # (kind, layer) -> node address in the current graph
        kinds = [("ffn_moe_topk", on_topk), ("ffn_moe_weights", on_weights), *(extra or {}).items()]
        for layer in moe_layers:
            for kind, fn in kinds:
                if fn is not None:
                    self._want[f"{kind}-{layer}".encode()] = (fn, layer)
            for kind in peek:
                self._peek[f"{kind}-{layer}".encode()] = (kind, layer)
        self._discover: dict[bytes, tuple[str, int]] = {}
        for layer in moe_layers:
            for m in ("gate", "up", "down"):
                self._discover[f"ffn_moe_{m}-{layer}".encode()] = (m, layer)
            self._discover[f"ffn_moe_logits-{layer}".encode()] = ("router", layer)
            self._discover[f"ffn_norm-{layer}".encode()] = ("norm", layer)
        self._n_discover = len(self._discover)
        self.calls = 0
        self.seconds = 0.0  # time spent in the callback (ask and compute), for its cost
        self.error: BaseException | None = None

    @property
    def ready(self) -> bool:
        """True once every expert weight tensor has been found."""
        return not self._discover

    def __call__(self, ptr: int, ask: bool, user_data: int) -> bool:  # noqa: ARG002 - C signature
        t0 = time.perf_counter()
        try:
            name = name_of(ptr)
            if ask:
                if self._discover:
                    self._find(name, ptr)
                hit = self._peek.get(name)
                if hit is not None:
                    self.peeked[hit] = ptr
                    return False
                return name in self._want
            entry = self._want.get(name)
            if entry is not None:
                entry[0](entry[1], ptr)
            return True
        except BaseException as exc:  # never let an exception unwind through C
            if self.error is None:
                self.error = exc
                logging.getLogger(__name__).error("eval callback failed", exc_info=exc)
            return True
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - t0

    def _find(self, name: bytes, ptr: int) -> None:
        hit = self._discover.pop(name, None)
        if hit is None:
            return
        what, layer = hit
        t = tensor_at(ptr)
        if what == "router":
            self.discovered.routers[layer] = int(t.src[0])
        elif what == "norm":
            if t.op == GGML_OP_MUL and t.src[1]:
                self.discovered.ffn_norms[layer] = int(t.src[1])
        else:
            self.discovered.experts[(layer, what)] = int(t.src[0])


def read_topk(ptr: int) -> np.ndarray:
    """Live view ``[n_tokens, k]`` of an ffn_moe_topk node (writable: rewriting it re-routes)."""
    return i32_matrix(ptr)


def read_f32(ptr: int) -> np.ndarray:
    """Live view ``[rows, cols]`` of an F32 node (probs: [n_tokens, E]; ffn_inp: [n_tokens, d])."""
    return f32_matrix(ptr)


def weight_matrix(ptr: int) -> np.ndarray:
    """Copy of an F32 model weight (router ``[E, d]``, norm ``[d]``) as float32."""
    t = tensor_at(ptr)
    if t.type != 0:  # GGML_TYPE_F32
        raise ValueError("expected an F32 weight")
    ne0, ne1 = int(t.ne[0]), int(t.ne[1])
    buf = (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * (ne0 * ne1)).from_address(int(t.data))))
    return np.array(buf, dtype=np.float32).reshape(ne1, ne0) if ne1 > 1 else np.array(buf, dtype=np.float32)
