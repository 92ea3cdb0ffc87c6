"""Look-ahead: predict the experts of layers l+1 … l+d from the hidden state at layer l.

The residual stream changes slowly from layer to layer, so applying layer ``l+j``'s router to
the hidden state available at layer ``l`` names most of the experts layer ``l+j`` will pick
(HOBBIT, Fate, DynaExq report 90–97% top-1 accuracy at distance 1 on Mixtral-class models).
The runtime prefetches the predicted experts' byte ranges while layer ``l`` computes.

Selection is the top-k of the router's scores. Softmax and sigmoid are monotonic, so without a
selection bias the top-k of the raw logits is the top-k of the probabilities and no exponential
is computed. With a bias (DeepSeek-style ``exp_probs_b``, added to the probabilities for
selection only) the probabilities are computed first. Group-limited routing (DeepSeek-V3
``n_group``) is not modelled.

The router of layer ``l+j`` reads the *normalised* input of its FFN block. RMSNorm is a
positive per-token scale, which cannot change a top-k, times the norm's weight vector, which can;
pass that layer's ``ffn_norm`` weight as ``norm_weight`` to include it.

:class:`LookaheadStats` keeps the running recall of the predictions, pooled and per target layer
and distance, so the runtime can shorten or stop prefetching when it stops paying.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Gating = Literal["softmax", "sigmoid"]


def predict(
    hidden: np.ndarray,
    router: np.ndarray,
    k: int,
    *,
    norm_weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    gating: Gating = "softmax",
    eps: float = 1e-6,
) -> np.ndarray:
    """Experts the router would select for ``hidden``: int32 (n, k), best first.

    ``hidden`` (n, d) or (d,); ``router`` (E, d), the ``ffn_gate_inp`` weight of the target
    layer (GGUF ``ne = [d, E]``); ``norm_weight`` (d,) that layer's FFN norm weight, applied as
    RMSNorm; ``bias`` (E,) a selection bias added to the gated probabilities.
    """
    hidden = np.asarray(hidden, dtype=np.float32)
    if hidden.ndim == 1:
        hidden = hidden[None, :]
    router = np.asarray(router, dtype=np.float32)
    n_expert = router.shape[0]
    if hidden.ndim != 2 or router.ndim != 2 or hidden.shape[1] != router.shape[1]:
        raise ValueError(
            f"Expected hidden (tokens, d) and router (experts, d) with one d, got {hidden.shape} and {router.shape}."
        )
    if not 1 <= k <= n_expert:
        raise ValueError(f"Expected 1 <= k <= {n_expert}, got {k}.")
    if norm_weight is not None:
        rms = np.sqrt(np.mean(hidden * hidden, axis=1, keepdims=True) + eps)  # (n, 1)
        hidden = hidden / rms * np.asarray(norm_weight, dtype=np.float32)
    scores = hidden @ router.T  # (n, E) logits
    if bias is not None:
        if gating == "softmax":
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        elif gating == "sigmoid":
            scores = 1.0 / (1.0 + np.exp(-scores))
        else:
            raise ValueError(f"Expected gating 'softmax' or 'sigmoid', got {gating!r}.")
        scores = scores + np.asarray(bias, dtype=np.float32)
    if k == n_expert:
        top = np.broadcast_to(np.arange(n_expert), scores.shape)
    else:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (n, k), unordered
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1).astype(np.int32)


def count_hits(predicted: np.ndarray, actual: np.ndarray) -> int:
    """How many of the ``actual`` (n, k) selections appear in the same token's ``predicted``
    (n, p) set. Ids are assumed distinct within a token's row."""
    predicted = np.asarray(predicted)
    actual = np.asarray(actual)
    if predicted.ndim == 1:
        predicted = predicted[None, :]
    if actual.ndim == 1:
        actual = actual[None, :]
    if predicted.shape[0] != actual.shape[0]:
        raise ValueError(
            f"Expected predictions and selections for the same tokens, got {predicted.shape[0]} "
            f"and {actual.shape[0]} rows."
        )
    return int((actual[:, :, None] == predicted[:, None, :]).any(axis=2).sum())


def recall(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Share of the ``actual`` selections (n, k) found in ``predicted`` (n, p); NaN if none."""
    actual = np.asarray(actual)
    return count_hits(predicted, actual) / actual.size if actual.size else float("nan")


class LookaheadStats:
    """Running recall of look-ahead predictions, by target layer and by distance.

    Recall = hits / actual selections: of the experts a layer really selected, the share that
    had been predicted. Precision = hits / predicted ids (how much prefetching was wasted).
    Counters are pooled from the first update (or the last :meth:`reset`).
    """

    def __init__(self, n_layer: int, max_distance: int = 1) -> None:
        if n_layer < 1 or max_distance < 1:
            raise ValueError(f"Expected n_layer >= 1 and max_distance >= 1, got {n_layer} and {max_distance}.")
        self.n_layer = n_layer
        self.max_distance = max_distance
        shape = (n_layer, max_distance)  # (target layer, distance − 1)
        self._hits = np.zeros(shape, dtype=np.int64)
        self._actual = np.zeros(shape, dtype=np.int64)
        self._predicted = np.zeros(shape, dtype=np.int64)

    def update(self, layer: int, distance: int, predicted: np.ndarray, actual: np.ndarray) -> int:
        """Score a prediction of ``layer``'s experts made ``distance`` layers earlier.

        ``predicted`` (n, p) and ``actual`` (n, k) ids for the same tokens. Returns the hits.
        """
        if not 0 <= layer < self.n_layer or not 1 <= distance <= self.max_distance:
            raise ValueError(
                f"Expected layer in [0, {self.n_layer}) and distance in [1, "
                f"{self.max_distance}], got layer {layer}, distance {distance}."
            )
        hits = count_hits(predicted, actual)
        self._hits[layer, distance - 1] += hits
        self._actual[layer, distance - 1] += np.size(actual)
        self._predicted[layer, distance - 1] += np.size(predicted)
        return hits

    def record(self, layer: int, distance: int, hits: int, n_actual: int, n_predicted: int) -> None:
        """Add counts already computed by the caller (the runtime's hot path: no validation)."""
        self._hits[layer, distance - 1] += hits
        self._actual[layer, distance - 1] += n_actual
        self._predicted[layer, distance - 1] += n_predicted

    def reset(self) -> None:
        """Zero all counters."""
        for counts in (self._hits, self._actual, self._predicted):
            counts[...] = 0

    @staticmethod
    def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    @property
    def recall(self) -> float:
        """Recall over all layers and distances; NaN before any update."""
        return float(self._ratio(self._hits.sum(), self._actual.sum()))

    @property
    def precision(self) -> float:
        """Hits over predicted ids, over all layers and distances; NaN before any update."""
        return float(self._ratio(self._hits.sum(), self._predicted.sum()))

    @property
    def recall_by_layer(self) -> np.ndarray:
        """Recall per target layer, float64 [L] (all distances pooled); NaN where unseen."""
        return self._ratio(self._hits.sum(axis=1), self._actual.sum(axis=1))

    @property
    def recall_by_distance(self) -> np.ndarray:
        """Recall per distance 1 … D, float64 [D] (all layers pooled); NaN where unseen."""
        return self._ratio(self._hits.sum(axis=0), self._actual.sum(axis=0))

    @property
    def recall_table(self) -> np.ndarray:
        """Recall per (target layer, distance − 1), float64 [L, D]; NaN where unseen."""
        return self._ratio(self._hits, self._actual)


class Predictor:
    """The runtime's predictor: :func:`predict` without the per-token work that cannot change a top-k.

    Built once from each MoE layer's router ``(E, d)`` and FFN norm weight ``(d,)``; the norm weight
    is folded into the router and the per-token RMS scale is dropped (a positive scale of a row keeps
    its ranking), so a prediction is one matmul and one partition. Selects the same experts as
    :func:`predict` with ``norm_weight`` (as sets: the order within a row is not kept).
    """

    def __init__(self, routers: dict[int, np.ndarray], norms: dict[int, np.ndarray], k: int) -> None:
        self.k = k
        # (d, E) per MoE layer index, so that hidden (n, d) @ it gives the logits (n, E)
        self._folded = {
            mi: np.ascontiguousarray((np.asarray(r, dtype=np.float32) * norms.get(mi, 1.0)).T)
            for mi, r in routers.items()
        }

    def covers(self, moe_index: int) -> bool:
        """Whether the layer's router is known (F32 routers only)."""
        return moe_index in self._folded

    def predict(self, hidden: np.ndarray, moe_index: int) -> np.ndarray:
        """Experts layer ``moe_index`` would select for ``hidden`` (n, d): int (n, k), unordered."""
        logits = hidden @ self._folded[moe_index]  # (n, E)
        return np.argpartition(logits, -self.k, axis=1)[:, -self.k:]


class PrefetchGate:
    """Per target layer: prefetch only while the predictions for it have recently been good.

    ``recent[l]`` is a moving average of layer ``l``'s look-ahead recall, ``alpha`` the weight of the
    latest token. Prefetch for ``l`` stops when it falls below ``floor`` and resumes only at
    ``floor + band`` (hysteresis, so the decision does not flap at the boundary). Predictions go on
    either way, so prefetch comes back when routing becomes predictable. ``floor = 0``: always on.
    """

    def __init__(self, n_layer: int, floor: float, *, alpha: float = 0.1, band: float = 0.05) -> None:
        self.floor = floor
        self.alpha = alpha
        self.band = band
        self.recent = np.ones(n_layer)  # optimistic until measured
        self.on = np.ones(n_layer, dtype=bool)

    def update(self, layer: int, recall: float) -> None:
        """Fold one token's recall for ``layer`` in and decide whether to prefetch for it."""
        self.recent[layer] += self.alpha * (recall - self.recent[layer])
        if self.on[layer] and self.recent[layer] < self.floor:
            self.on[layer] = False
        elif not self.on[layer] and self.recent[layer] >= min(1.0, self.floor + self.band):
            self.on[layer] = True
