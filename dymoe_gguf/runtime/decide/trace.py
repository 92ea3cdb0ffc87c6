"""Recorded MoE routing, and the statistics the policy is tuned and checked on.

A :class:`RoutingTrace` is what the router chose for ``T`` tokens at each of ``L`` MoE layers:
the ``k`` selected experts per token and layer, their gate weights as the model applies them
(after any top-k renormalisation), and optionally the full router softmax over all ``E`` experts.
Layers are the model's MoE layers in order (index ``l`` is the ``l``-th MoE layer, which is the
GGUF block index when every block has experts). A trace records the router's own choice: ids are
distinct within a (token, layer), before any skip or re-route.

The statistics are plain functions of a trace:

- :func:`expert_load`   share of tokens that select each expert, [L, E] (rows sum to k)
- :func:`gate_mass`     mean gate weight each expert receives per token, [L, E]
- :func:`normalized_entropy`  how evenly a layer's load is spread, 0 (one expert) … 1 (uniform)
- :func:`transition_predictability`  how well layer l+1's experts follow from layer l's
- :func:`popularity_recall`  the same score for a predictor that ignores layer l (a baseline)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Routing of ``T`` tokens through ``L`` MoE layers of ``E`` experts, ``k`` chosen each."""

    ids: np.ndarray  # (T, L, k) int32, selected experts in the model's slot order
    weights: np.ndarray  # (T, L, k) float32, gate weights as the model applies them
    n_expert: int  # E: ids alone cannot tell how many experts a layer has
    probs: np.ndarray | None = None  # (T, L, E) float32, full router softmax, if recorded

    def __post_init__(self) -> None:
        ids = np.ascontiguousarray(self.ids, dtype=np.int32)
        weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        if ids.ndim != 3:
            raise ValueError(f"Expected ids of shape (tokens, layers, k), got shape {ids.shape}.")
        if weights.shape != ids.shape:
            raise ValueError(f"Expected weights of the same shape as ids {ids.shape}, got {weights.shape}.")
        if self.n_expert < 1:
            raise ValueError(f"Expected n_expert >= 1, got {self.n_expert}.")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_expert):
            raise ValueError(
                f"Expected expert ids in [0, {self.n_expert}), got ids from {ids.min()} to "
                f"{ids.max()}; is n_expert right?"
            )
        probs = self.probs
        if probs is not None:
            probs = np.ascontiguousarray(probs, dtype=np.float32)
            expected = (*ids.shape[:2], self.n_expert)
            if probs.shape != expected:
                raise ValueError(f"Expected probs of shape {expected}, got {probs.shape}.")
        # Read-only views: no copy of a large trace, and the caller's own arrays stay writable.
        object.__setattr__(self, "ids", _read_only(ids))
        object.__setattr__(self, "weights", _read_only(weights))
        object.__setattr__(self, "n_expert", int(self.n_expert))
        object.__setattr__(self, "probs", None if probs is None else _read_only(probs))

    @property
    def n_tokens(self) -> int:
        """T, recorded tokens."""
        return self.ids.shape[0]

    @property
    def n_layer(self) -> int:
        """L, MoE layers."""
        return self.ids.shape[1]

    @property
    def top_k(self) -> int:
        """k, experts selected per token and layer."""
        return self.ids.shape[2]

    @classmethod
    def concatenate(cls, parts: Sequence[RoutingTrace]) -> RoutingTrace:
        """Join traces of the same model along the token axis (e.g. one per prompt)."""
        if not parts:
            raise ValueError("Expected at least one trace to concatenate, got none.")
        first = parts[0]
        for part in parts[1:]:
            if part.ids.shape[1:] != first.ids.shape[1:] or part.n_expert != first.n_expert:
                raise ValueError(
                    f"Expected traces of shape (*, {first.n_layer}, {first.top_k}) with "
                    f"{first.n_expert} experts, got (*, {part.n_layer}, {part.top_k}) with "
                    f"{part.n_expert}."
                )
        with_probs = [p.probs is not None for p in parts]
        if any(with_probs) and not all(with_probs):
            raise ValueError("Expected all traces or none to carry probs, got a mix.")
        return cls(
            ids=np.concatenate([p.ids for p in parts]),
            weights=np.concatenate([p.weights for p in parts]),
            n_expert=first.n_expert,
            probs=np.concatenate([p.probs for p in parts]) if all(with_probs) else None,
        )


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.setflags(write=False)
    return view


def _layer_bincount(trace: RoutingTrace, weights: np.ndarray | None) -> np.ndarray:
    """Sum ``weights`` (or count) per (layer, expert) over tokens and slots, float64 [L, E]."""
    n_layer, n_expert = trace.n_layer, trace.n_expert
    offset = (np.arange(n_layer, dtype=np.int64) * n_expert)[None, :, None]  # (1, L, 1)
    flat = (trace.ids + offset).ravel()
    sums = np.bincount(
        flat,
        weights=None if weights is None else weights.ravel(),
        minlength=n_layer * n_expert,
    )
    return sums.astype(np.float64).reshape(n_layer, n_expert)


def expert_load(trace: RoutingTrace) -> np.ndarray:
    """Share of tokens that select each expert, float64 [L, E]; each row sums to k."""
    return _layer_bincount(trace, None) / max(trace.n_tokens, 1)


def gate_mass(trace: RoutingTrace) -> np.ndarray:
    """Mean gate weight each expert receives per token (0 when not selected), float64 [L, E].

    Each row sums to the mean of the per-token weight sums: 1 for models that renormalise
    their top-k weights.
    """
    return _layer_bincount(trace, trace.weights) / max(trace.n_tokens, 1)


def normalized_entropy(load: np.ndarray) -> np.ndarray:
    """Entropy of each row of ``load`` [L, E] over ``log E``: 1 = uniform, 0 = one expert.

    Rows are normalised to distributions first, so any non-negative load works
    (:func:`expert_load`, :func:`gate_mass`, counts). A row that sums to 0 gives NaN.
    """
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2 or load.shape[1] < 2:
        raise ValueError(f"Expected a load of shape (layers, experts >= 2), got {load.shape}.")
    total = load.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = load / total
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -terms.sum(axis=1) / np.log(load.shape[1])
    entropy[total[:, 0] <= 0] = np.nan
    return entropy


def _multi_hot(ids: np.ndarray, n_expert: int) -> np.ndarray:
    """(T, k) expert ids → (T, E) float32 with 1 where selected."""
    out = np.zeros((ids.shape[0], n_expert), dtype=np.float32)
    np.put_along_axis(out, ids.astype(np.intp), 1.0, axis=1)
    return out


def _split(n_tokens: int, fit_fraction: float) -> tuple[slice, slice]:
    """Fit and evaluation token ranges; the same range twice when ``fit_fraction == 1``."""
    if not 0.0 < fit_fraction <= 1.0:
        raise ValueError(f"Expected fit_fraction in (0, 1], got {fit_fraction}.")
    if fit_fraction == 1.0:
        return slice(0, n_tokens), slice(0, n_tokens)
    n_fit = int(round(n_tokens * fit_fraction))
    if n_fit < 1 or n_fit >= n_tokens:
        raise ValueError(
            f"Expected enough tokens to split {fit_fraction:.2f} / {1 - fit_fraction:.2f} into "
            f"fit and evaluation, got {n_tokens}."
        )
    return slice(0, n_fit), slice(n_fit, n_tokens)


def _recall(scores: np.ndarray, actual: np.ndarray, k: int) -> float:
    """Share of the ones in ``actual`` (T, E) that fall in the top-``k`` of ``scores`` (T, E)."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    hits = np.take_along_axis(actual, top, axis=1).sum()
    total = actual.sum()
    return float(hits / total) if total else float("nan")


def transition_predictability(trace: RoutingTrace, fit_fraction: float = 0.5) -> np.ndarray:
    """Top-k recall at layer l+1 of a co-occurrence predictor fed layer l's choice, [L − 1].

    Exactly: on the first ``fit_fraction`` of the tokens, count ``C[e, f]`` = tokens that chose
    ``e`` at layer l and ``f`` at layer l+1, and form ``P(f | e) = C[e, f] / count(e)``. On the
    remaining tokens, score each expert ``f`` of layer l+1 by the vote
    ``Σ_{e ∈ S_l} P(f | e)`` over the token's layer-l set ``S_l``, predict the ``k`` best, and
    report the share of the actually selected layer-(l+1) experts that were predicted (hits over
    selections, pooled over tokens). ``fit_fraction=1`` fits and scores on all tokens (an
    in-sample, optimistic figure).

    1.0 means layer l's choice determines layer l+1's; for routing independent across layers it
    tends to :func:`popularity_recall` (``k / E`` when routing is also uniform). It measures
    what a routing-history predictor can achieve; :mod:`.lookahead` measures the router-on-hidden
    predictor that the runtime uses.
    """
    if trace.n_layer < 2:
        raise ValueError(f"Expected a trace with >= 2 layers, got {trace.n_layer}.")
    fit, ev = _split(trace.n_tokens, fit_fraction)
    k, n_expert = trace.top_k, trace.n_expert
    out = np.empty(trace.n_layer - 1, dtype=np.float64)
    here_fit = _multi_hot(trace.ids[fit, 0], n_expert)
    here_ev = _multi_hot(trace.ids[ev, 0], n_expert)
    for layer in range(trace.n_layer - 1):
        next_fit = _multi_hot(trace.ids[fit, layer + 1], n_expert)
        next_ev = _multi_hot(trace.ids[ev, layer + 1], n_expert)
        cooc = here_fit.T @ next_fit  # (E, E): C[e, f]
        seen = here_fit.sum(axis=0)  # (E,): count(e)
        cond = cooc / np.maximum(seen, 1.0)[:, None]  # P(f | e), 0 for unseen e
        out[layer] = _recall(here_ev @ cond, next_ev, k)
        here_fit, here_ev = next_fit, next_ev
    return out


def popularity_recall(trace: RoutingTrace, fit_fraction: float = 0.5) -> np.ndarray:
    """Top-k recall at layer l+1 of always predicting its k most frequent experts, [L − 1].

    Fitted and scored on the same split as :func:`transition_predictability`, whose excess over
    this baseline is the part of the prediction that comes from layer l rather than from skew.
    """
    if trace.n_layer < 2:
        raise ValueError(f"Expected a trace with >= 2 layers, got {trace.n_layer}.")
    fit, ev = _split(trace.n_tokens, fit_fraction)
    k, n_expert = trace.top_k, trace.n_expert
    out = np.empty(trace.n_layer - 1, dtype=np.float64)
    for layer in range(1, trace.n_layer):
        freq = _multi_hot(trace.ids[fit, layer], n_expert).sum(axis=0)  # (E,)
        actual = _multi_hot(trace.ids[ev, layer], n_expert)
        out[layer - 1] = _recall(np.broadcast_to(freq, actual.shape), actual, k)
    return out
