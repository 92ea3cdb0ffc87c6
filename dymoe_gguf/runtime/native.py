"""The per-expert hot path in C (patched builds with patches/0003): what :mod:`.step` does in Python at
each layer's safe point, done inside llama.cpp's MUL_MAT_ID without a graph split.

Per MoE layer and token the C hook logs the routing (ids and gate weights), checks the ``ready``
flags the pager keeps and calls :meth:`NativePath.on_miss` only for selected experts whose view is
not resident (evict if needed, read in bulk: the pager's ``use``), predicts the next layer's experts
from this layer's input and queues those not resident for the pager's thread (woken through its
pipe), and scores its previous prediction. Python runs once per decode (:meth:`NativePath.drain`):
importance, look-ahead recall and the prefetch gate, recency, re-planning.

What stays on the Python path (:class:`.step.Step` in the eval callback): stock builds (per-layer
views), skipping slots (it rewrites the weights node), recording traces, extra eval-callback handlers
(calibration), policy ``observe``.
Look-ahead in C predicts one layer ahead, from the layer's normalised FFN input.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from dymoe_gguf._native import hot
from dymoe_gguf.bundle.format import MATRICES
from dymoe_gguf.runtime.observe import Discovered, weight_address, weight_matrix

log = logging.getLogger(__name__)
MIN_NORM = 1e-6  # |norm weight| below this is clamped when folding one layer's norm into the next router


class NativePath:
    """The C hooks of one controlled model, and the Python work they leave for each decode."""

    def __init__(self, lib: Any, step: Any, index: Any, discovered: Discovered, n_batch: int) -> None:
        self.step = step
        self.moe = step.moe_layers
        self.hot = hot.HotPath(lib, len(self.moe), step.importance.top_k, n_batch * len(self.moe), self.on_miss,
                               step.pager.wake_w)
        self.prefetch = np.ones(len(self.moe), dtype=np.uint8)  # the gate's decision, read by C
        self._seen = np.zeros((3, len(self.moe)), dtype=np.int64)  # prediction counters already folded in
        self.drain_seconds = 0.0
        self._since = 0  # tokens decoded since the last drain
        self.dropped_rows = 0
        self._drained_calls = 0  # hook calls when the log was last taken
        self._install(index, discovered)
        step.pager.external = self._requests
        step.pager.reading = self._reading

    def _install(self, index: Any, d: Discovered) -> None:
        pager, types = self.step.pager, sorted({int(t.ggml_type) for t in index.tiers})
        norms = {mi: weight_matrix(d.ffn_norms[layer]) for mi, layer in enumerate(self.moe) if layer in d.ffn_norms}
        for mi, layer in enumerate(self.moe):
            for m in MATRICES:
                self.hot.reserve(d.experts[(layer, m)], types)
            router = weight_address(d.routers[layer]) if layer in d.routers else None
            nxt = mi + 1 if mi + 1 < len(self.moe) and self.step.lookahead > 0 else -1
            next_router = self._folded(d, nxt, norms.get(mi)) if nxt >= 0 else None
            self.hot.hook(d.experts[(layer, d.first_matrix.get(layer, "up"))], layer=mi, ready=pager.ready[layer],
                          router_ptr=router, renorm=self.step.renormalised, next_layer=nxt if next_router is not None
                          else -1, next_router=next_router, next_ready=pager.ready[self.moe[nxt]] if nxt >= 0 else None,
                          prefetch=self.prefetch[nxt:nxt + 1] if nxt >= 0 else None)

    def _folded(self, d: Discovered, mi: int, norm_here: np.ndarray | None) -> np.ndarray | None:
        """Layer ``mi``'s router for the previous layer's normalised input: ``R · g_mi / g_prev``."""
        layer = self.moe[mi]
        try:
            router = weight_matrix(d.routers[layer])  # [E, d]
        except (KeyError, ValueError):
            return None
        scale = np.ones(router.shape[1], dtype=np.float32)
        if layer in d.ffn_norms:
            scale = scale * weight_matrix(d.ffn_norms[layer])
        if norm_here is not None:
            scale = scale / np.where(np.abs(norm_here) < MIN_NORM, np.copysign(MIN_NORM, norm_here), norm_here)
        return np.ascontiguousarray(router * scale, dtype=np.float32)

    # ------------------------------------------------------------------ called from C
    def on_miss(self, mi: int, experts: np.ndarray) -> None:
        """Selected experts of MoE layer ``mi`` whose view is not resident (compute thread, before the
        layer's matmuls): read at their planned tiers, or the lowest when that breaks the budget."""
        try:
            step, layer = self.step, self.moe[mi]
            planned = step.planner.view_tiers[mi][experts].astype(np.int64)
            tiers = step.fit_budget(layer, experts, planned)
            row = step.planner.view_tiers[mi].copy()
            row[experts] = tiers  # lowered for this batch, or back to the plan (inside the hook: reserved types)
            step.views.set_experts(layer, row, only=experts)
            step.pager.use(layer, experts, tiers)
        except BaseException as exc:  # never unwind through C: raised when the decode returns
            step.observer.guard.fail(exc)

    def _reading(self) -> tuple[int, np.ndarray] | None:
        now = self.hot.reading()
        return None if now is None else (self.moe[now[0]], now[1])

    def _requests(self) -> list[tuple[int, int, int]]:
        reqs = self.hot.take_requests()
        vt = self.step.planner.view_tiers
        return [(self.moe[mi], int(e), int(vt[mi, e])) for mi, e in reqs.tolist()]

    # ------------------------------------------------------------------ every few decodes
    DRAIN_EVERY = 8  # decoded tokens folded in at once: importance, recency and recall lag by at most this

    def after_decode(self, n_tokens: int) -> None:
        """Called after each llama_decode of ``n_tokens``: fold the log in every few tokens (a
        batch at once, before the log could overflow)."""
        self._since += n_tokens
        if n_tokens > 1 or self._since >= self.DRAIN_EVERY:
            self.drain()
        self.prefetch[:] = self.step.gate.on & self.step.trial.on

    def drain(self) -> None:
        """Fold the decode's log and counters in: importance, recency, look-ahead recall, re-planning."""
        self._since = 0
        calls = self.hot.times()[0]
        if calls == self._drained_calls:
            return  # no hook ran since the last drain: no work, no time counted (stats stay stable)
        self._drained_calls = calls
        t0 = time.perf_counter()
        layers, ids, weights, dropped = self.hot.take_log()
        self.dropped_rows += dropped
        if len(layers):
            self._fold(layers, ids, weights)
        self.drain_seconds += time.perf_counter() - t0

    def _fold(self, layers: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        step, pager, c = self.step, self.step.pager, self.hot.counters
        n_tokens = int((layers == 0).sum())
        k = step.importance.top_k
        ids, weights = ids[:, :k], weights[:, :k]
        if step.replan_every is not None:  # the tokens since the last drain, as one batch per layer
            for mi in np.unique(layers).tolist():
                sel = layers == mi
                step.importance.update(mi, ids[sel], weights[sel])
        pager.new_step()
        blocks = np.asarray(self.moe)[layers][:, None].repeat(k, axis=1)
        pager.touch(blocks.ravel(), ids.ravel(), np.asarray(step.planner.view_tiers)[layers[:, None], ids].ravel())
        step.counter.uses[:] = c[0]
        step.counter.hits[:] = c[0] - c[1]
        delta = c[2:5] - self._seen  # prediction hits, selections scored, predicted, per target layer
        self._seen = c[2:5].copy()
        for mi in np.flatnonzero(delta[1]).tolist():
            step.counter.lookahead.record(mi, 1, int(delta[0, mi]), int(delta[1, mi]), int(delta[2, mi]))
            step.gate.update(mi, delta[0, mi] / delta[1, mi])
        step.count_tokens(n_tokens)

    def seconds(self) -> tuple[float, float]:
        """Time the hot path cost: hooks (C) plus the per-decode drain (Python); and time in misses."""
        _calls, hook_s, miss_s = self.hot.times()
        return hook_s + self.drain_seconds, miss_s

    def close(self) -> None:
        """Unregister the hooks (before the model or the pager is freed)."""
        self.hot.clear()
        self.step.pager.external = self.step.pager.reading = None



def start(ctl: Any, loaded: Any) -> NativePath | None:
    """Hand the safe point to C when this build, mode and configuration allow it (see the module
    docstring); the Python eval callback then stops being called at all."""
    cfg = ctl.cfg
    if (loaded.hot_lib is None or ctl.patch is None or cfg.skip_threshold > 0 or cfg.hot_path == "python"
            or ctl.step.pager is None or ctl.step.trace is not None or ctl.extra_handlers):
        return None
    path = NativePath(loaded.hot_lib, ctl.step, ctl.index, loaded.discovered, ctl._llm.n_batch)
    ctl.step.native = True
    ctl.step.native_path = path
    loaded.forward.fn = None
    return path


def stop(ctl: Any, loaded: Any) -> None:
    """Back to the Python safe point (a trace is recorded, or the controller closes)."""
    if ctl.native is None:
        return
    ctl.native.drain()
    ctl.native.close()
    ctl.native = None
    ctl.step.native = False
    ctl.step.native_path = None
    if loaded is not None and loaded.forward is not None:
        hot.forward_again(loaded.forward, loaded.callback[0])
