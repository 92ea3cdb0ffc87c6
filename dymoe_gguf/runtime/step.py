"""The per-token hot path, run inside llama.cpp's eval callback.

At each MoE layer's safe point (``ffn_moe_topk-N`` computed, the layer's expert matmuls not yet
run) :meth:`Step.on_topk` does only what must happen before those matmuls: read the routing, drop
low-weight slots (skip), point the selected experts at their planned tiers, tell the pager which
bytes are about to be read (it evicts first when the budget would break, and reads what is missing
in bulk), and queue prefetches for the experts look-ahead predicts in the next layers.
Bookkeeping — importance, look-ahead recall, re-planning — waits for the end of the token, when it
is done for all layers at once (:meth:`Step.end_of_token`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dymoe_gguf.runtime import decide
from dymoe_gguf.runtime.config import Policy, RuntimeConfig
from dymoe_gguf.runtime.guard import Guard
from dymoe_gguf.runtime.observe import LayerRouting, Observer, read_f32, read_topk
from dymoe_gguf.runtime.stats import StatsCounter

MIN_WEIGHT_SUM = 6.1e-5  # llama.cpp's clamp when it renormalises top-k weights (ffn_moe_weights_norm)


class Step:
    """Per-layer and per-token work of one controller; ``views``/``pager`` are None when observing."""

    def __init__(self, moe_layers: tuple[int, ...], cfg: RuntimeConfig, counter: StatsCounter, *,
                 renormalised: bool) -> None:
        self.moe_layers = moe_layers
        self.moe_index = {layer: i for i, layer in enumerate(moe_layers)}
        self.counter = counter
        self.renormalised = renormalised  # the arch renormalises its top-k weights (norm_w)
        self.skip = decide.SkipConfig(threshold=cfg.skip_threshold) if cfg.skip_threshold > 0 else None
        self.lookahead = cfg.lookahead
        # tokens between re-plans (None: the plan is frozen)
        self.replan_every = cfg.reallocate_every if cfg.policy is Policy.DYMOE else None
        self.measure_hits = cfg.measure_hits
        self.observing = cfg.policy is Policy.OBSERVE
        self.gate = decide.PrefetchGate(len(moe_layers), cfg.lookahead_min_recall)
        # wired by the controller once the model is loaded
        self.observer: Any = None
        self.importance: decide.ImportanceTracker | None = None
        self.planner: decide.Planner | None = None
        self.views: Any = None  # None while observing
        self.pager: Any = None
        self.predictor: decide.Predictor | None = None
        self.trace: list[LayerRouting] | None = None  # when a list: every layer's routing (calibrate, tests)
        self.routing_hooks: list = []  # fn(layer, ids [n_tokens, k]) after each layer's routing is read
        self._token: list[LayerRouting] = []  # this token's routing, per MoE layer
        self._predicted: dict[int, list[tuple[int, np.ndarray]]] = {}  # target -> [(distance, ids)]
        self._skip_weights: dict[int, np.ndarray] = {}
        self._since_replan = 0

    def make_observer(self, extra: dict, guard: Guard) -> Observer:
        """The eval callback: handlers by node kind (each costs a graph split per layer) and the kinds
        to peek (read at the safe point without a split of their own)."""
        handlers = {"ffn_moe_topk": self.on_topk, **extra}
        if self.skip is not None:
            handlers["ffn_moe_weights"] = self.on_weights
        if self.lookahead > 0 and not self.observing:
            handlers.setdefault("l_out", self.on_layer_out)
        peek = ("ffn_moe_probs", "ffn_inp") if self.lookahead > 0 else ("ffn_moe_probs",)
        self.observer = Observer(self.moe_layers, handlers, peek, guard=guard)
        return self.observer

    # ------------------------------------------------------------------ the safe point
    def on_topk(self, layer: int, ptr: int) -> None:
        view = read_topk(ptr)
        ids = view.copy()  # [n_tokens, k]
        mi = self.moe_index[layer]
        n = len(ids)
        peeked = self.observer.peeked
        p_ptr = peeked.get(("ffn_moe_probs", layer))
        probs = read_f32(p_ptr) if p_ptr is not None else None  # live view: read now, never kept
        if probs is not None and len(probs) == n:
            w = probs[np.arange(n)[:, None], ids]
            if self.renormalised:
                w /= np.maximum(w.sum(1, keepdims=True), MIN_WEIGHT_SUM)
        else:
            w = np.full(ids.shape, 1.0 / ids.shape[1], dtype=np.float32)
        if mi == 0:
            self._token = []
            if self.pager is not None:
                self.pager.new_step()
        hidden_ptr = peeked.get(("ffn_inp", layer))
        routing = LayerRouting(mi, ids, w, None, None)
        if self.trace is not None:
            routing = LayerRouting(mi, ids, w, np.array(probs) if probs is not None else None,
                                   np.array(read_f32(hidden_ptr)) if hidden_ptr is not None else None)
            self.trace.append(routing)
        self._token.append(routing)
        for hook in self.routing_hooks:
            hook(layer, ids)
        if self.views is not None:
            used = self._skip(layer, view, ids, w)
            experts = np.unique(used)
            tiers = self._point_views(mi, layer, experts)
            if self.pager is not None:
                if self.measure_hits and self.pager.budget is not None:
                    self.counter.hits[mi] += self.pager.count_resident(layer, experts, tiers)
                    self.counter.uses[mi] += len(experts)
                ok = tiers >= 0
                self.pager.use(layer, experts[ok], tiers[ok])
                if hidden_ptr is not None:
                    self._lookahead_early(mi, read_f32(hidden_ptr), n)
        if mi == len(self.moe_layers) - 1:
            self.end_of_token()

    def _point_views(self, mi: int, layer: int, experts: np.ndarray) -> np.ndarray:
        """Point the selected experts at their planned tiers, or — when this batch selects more of
        them than the budget holds at those tiers (a long prompt selects nearly all) — at the lowest
        tier for this batch. Returns the tier each selected expert reads."""
        row = self.planner.view_tiers[mi]
        tiers = row[experts]
        if self.views.mode == "per-layer":
            tiers = np.full(len(experts), self.planner.layer_tier(mi), dtype=row.dtype)
        budget = self.pager.budget if self.pager is not None else None
        if budget is not None and tiers.min() >= 0 and tiers.max() > 0:
            if self.pager.full[layer, experts, tiers].sum() > budget * self.pager.TARGET:
                tiers = np.zeros_like(tiers)
                self.counter.lowered_batches += 1
        if self.views.mode == "per-layer":
            self.views.set_layer(layer, int(tiers[0]))
        else:
            row = row.copy()
            row[experts] = tiers
            self.views.set_experts(layer, row, only=experts)
        return tiers

    def _skip(self, layer: int, view: np.ndarray, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Drop low-weight slots (rewriting the graph's ids now, its weights at ffn_moe_weights)."""
        if self.skip is None:
            return ids
        res = decide.skip_slots(ids, w, self.skip)
        if not res.n_dropped:
            return ids
        view[:] = res.ids
        self._skip_weights[layer] = res.weights
        self.counter.skipped += res.n_dropped
        return res.ids

    def on_weights(self, layer: int, ptr: int) -> None:
        """``ffn_moe_weights-N``: the weights of the slots dropped at the safe point become 0."""
        w = self._skip_weights.pop(layer, None)
        if w is not None:
            read_f32(ptr)[:] = w  # [n_tokens, k] view of ffn_moe_weights-N ([1, k, n_tokens])

    # ------------------------------------------------------------------ look-ahead
    def _prefetch(self, target: int, predicted: np.ndarray) -> None:
        if not self.gate.on[target]:  # predictions too poor to pay for their reads
            return
        experts = np.unique(predicted)
        tiers = self.planner.view_tiers[target][experts]
        ok = tiers >= 0
        self.pager.request(self.moe_layers[target], experts[ok], tiers[ok])

    def _lookahead_early(self, mi: int, hidden: np.ndarray, n: int) -> None:
        """At layer ``mi``'s safe point, from the residual stream entering its FFN: predict the next
        ``lookahead`` layers (distances >= 2 are scored here; distance 1 at ``l_out``) and prefetch."""
        if self.predictor is None or len(hidden) != n:
            return
        for dist in range(1, self.lookahead + 1):
            target = mi + dist
            if target >= len(self.moe_layers) or not self.predictor.covers(target):
                break
            predicted = self.predictor.predict(hidden, target)
            if dist > 1:
                self._predicted.setdefault(target, []).append((dist, predicted))
            self._prefetch(target, predicted)

    def on_layer_out(self, layer: int, ptr: int) -> None:
        """``l_out-N``: refine the prediction of layer N+1 from its input; scored as distance 1, and
        any expert the early prediction missed is prefetched."""
        target = self.moe_index[layer] + 1
        if self.predictor is None or target >= len(self.moe_layers) or not self.predictor.covers(target):
            return
        predicted = self.predictor.predict(read_f32(ptr), target)
        self._predicted.setdefault(target, []).append((1, predicted))
        if self.pager is not None:
            self._prefetch(target, predicted)

    # ------------------------------------------------------------------ end of the token
    def end_of_token(self) -> None:
        """After the last layer's routing: importance, look-ahead recall, re-planning, all layers at once."""
        token, self._token = self._token, []
        if not token:
            return
        n_tokens = len(token[0].ids)  # the last layer keeps output rows only
        if self.replan_every is not None:
            if len(token) == len(self.moe_layers) and all(len(r.ids) == 1 for r in token):  # decode
                self.importance.update_token(np.concatenate([r.ids for r in token]),
                                             np.concatenate([r.weights for r in token]))
            else:
                for r in token:
                    self.importance.update(r.moe_index, r.ids, r.weights)
        for r in token:
            for dist, predicted in self._predicted.pop(r.moe_index, ()):
                predicted = predicted[len(predicted) - len(r.ids):]  # the last layer keeps output rows only
                hits = decide.count_hits(predicted, r.ids)
                self.counter.lookahead.record(r.moe_index, dist, hits, r.ids.size, predicted.size)
                if dist == 1 and r.ids.size:
                    self.gate.update(r.moe_index, hits / r.ids.size)
        self._predicted.clear()
        self.counter.tokens += n_tokens
        self.counter.steps += 1
        self._since_replan += n_tokens
        if self.replan_every is not None and self._since_replan >= self.replan_every:
            self._since_replan = 0
            self.replan()

    def set_budget(self, budget: int) -> None:
        """A new budget (between decodes; checked by the caller): re-plan for it and evict down to it now."""
        self.planner.budget = self.pager.budget = budget
        self.replan(apply_all=True)
        self.pager.enforce_now()

    def replan(self, apply_all: bool = False) -> None:
        """Re-plan tiers and hand the plan to the pager and the views: per-layer views at once (safe
        between tokens, and in the last layer's callback, when the other layers' experts have been
        computed for this token); per-expert views as each expert is selected, or all at once with
        ``apply_all`` (between decodes only)."""
        self.planner.replan()
        if self.pager is not None:
            self.pager.set_plan(self.moe_layers, self.planner.kept, self.importance.scores)
        if self.views is None:
            return
        for mi, layer in enumerate(self.moe_layers):
            if self.views.mode == "per-layer":
                self.views.set_layer(layer, self.planner.layer_tier(mi))
            elif apply_all:
                self.views.set_experts(layer, self.planner.view_tiers[mi])
