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

from dymoe_gguf._native.tensor import f32_array, f32_matrix, f32_weight, i32_matrix, name_of, tensor_at
from dymoe_gguf.runtime.guard import Guard

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
    """The eval callback object.

    ``handlers`` maps a node kind (``"ffn_moe_topk"``, ``"l_out"``, ``"ffn_norm"`` …) to a function
    called with (layer, node address) when that node of a MoE layer has been computed; every kind
    named costs a graph split per layer. ``peek`` kinds are noted during the ask pass and readable
    from :attr:`peeked` in a handler, without a split of their own.

    Until :meth:`go_live`, only the warm-up runs: the top-k nodes are observed to learn ``k`` (and,
    with :attr:`warmup_expert` set, every slot is routed to that expert), and the weight tensors
    are discovered.
    """

    def __init__(self, moe_layers: tuple[int, ...], handlers: dict[str, Handler],
                 peek: tuple[str, ...] = ("ffn_moe_probs", "ffn_inp"), guard: Guard | None = None) -> None:
        self.discovered = Discovered()
        self._live: dict[bytes, tuple[Handler, int]] = {}
        self._warm: dict[bytes, tuple[Handler, int]] = {}
        self._peek: dict[bytes, tuple[str, int]] = {}
        self.peeked: dict[tuple[str, int], int] = {}  # (kind, layer) -> node address in the current graph
        for layer in moe_layers:
            for kind, fn in handlers.items():
                self._live[f"{kind}-{layer}".encode()] = (fn, layer)
            self._warm[f"ffn_moe_topk-{layer}".encode()] = (self._warmup_topk, layer)
            for kind in peek:
                self._peek[f"{kind}-{layer}".encode()] = (kind, layer)
        self._want = self._warm
        self._discover: dict[bytes, tuple[str, int]] = {}
        for layer in moe_layers:
            for m in ("gate", "up", "down"):
                self._discover[f"ffn_moe_{m}-{layer}".encode()] = (m, layer)
            self._discover[f"ffn_moe_logits-{layer}".encode()] = ("router", layer)
            self._discover[f"ffn_norm-{layer}".encode()] = ("norm", layer)
        self.k = 0  # experts selected per token, learnt in the warm-up
        self.warmup_expert: int | None = None
        self.calls = 0
        self.seconds = 0.0  # time spent in the callback (ask and compute), for its cost
        self.error: BaseException | None = None  # the first exception raised in a handler (for stats)
        self.guard = guard if guard is not None else Guard()

    @property
    def ready(self) -> bool:
        """True once every expert weight tensor has been found."""
        return not self._discover

    def go_live(self) -> None:
        """From now on, call the handlers."""
        self._want = self._live

    def _warmup_topk(self, layer: int, ptr: int) -> None:  # noqa: ARG002 - handler signature
        view = read_topk(ptr)
        self.k = view.shape[1]
        if self.warmup_expert is not None:  # read only the expert already brought in
            view[:] = self.warmup_expert

    def __call__(self, ptr: int, ask: bool, user_data: int) -> bool:  # noqa: ARG002 - C signature
        t0 = time.perf_counter()
        try:
            if self.guard.failing:  # stop this decode: ask for the node, then end the node loop on it
                return bool(ask)
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
        except BaseException as exc:  # never let an exception unwind through C: stop and re-raise later
            if self.error is None:
                self.error = exc
            if not isinstance(exc, KeyboardInterrupt):
                logging.getLogger(__name__).debug("eval callback failed", exc_info=exc)
            self.guard.fail(exc)
            return not ask  # computed node: False ends the scheduler's node loop
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


@dataclass(frozen=True, eq=False)
class LayerRouting:
    """One MoE layer's routing of one batch, as recorded in :attr:`Controller.trace`."""

    moe_index: int  # position among the model's MoE layers
    ids: np.ndarray  # [n_tokens, k] int32, the router's own selection (before any skip)
    weights: np.ndarray  # [n_tokens, k] float32, gate weights as the model applies them
    probs: np.ndarray | None  # [n_tokens, E] router probabilities, when they could be read
    hidden: np.ndarray | None  # [n_tokens, d] the FFN block's input (residual stream), when peeked


def read_topk(ptr: int) -> np.ndarray:
    """Live view ``[n_tokens, k]`` of an ffn_moe_topk node (writable: rewriting it re-routes)."""
    return i32_matrix(ptr)


def read_f32(ptr: int) -> np.ndarray:
    """Live view ``[rows, cols]`` of an F32 node (probs: [n_tokens, E]; ffn_inp: [n_tokens, d])."""
    return f32_matrix(ptr)


def read_f32_array(ptr: int) -> np.ndarray:
    """Live view of an F32 node in numpy order ``(ne3, ne2, ne1, ne0)`` without leading 1s."""
    return f32_array(ptr)


def weight_matrix(ptr: int) -> np.ndarray:
    """Copy of an F32 model weight (router ``[E, d]``, norm ``[d]``); ValueError for other types."""
    return f32_weight(ptr)
