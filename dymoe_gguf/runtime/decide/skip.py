"""DyMoE's "4/0" skip: give the least-weighted selected experts zero bits, i.e. do not run them.

llama.cpp's ``ffn_moe_topk-N`` tensor is always ``k`` ids wide, so a slot cannot be removed. A
dropped slot is instead **redirected to the token's top-1 expert** (already needed for this token,
so already in memory) and its **weight set to 0**: the duplicate row of the top-1 expert is
computed (one more row in a matmul the kernel runs anyway, no extra bytes read) and multiplied by
zero, so it adds nothing to the output. The weights of the kept slots are scaled by
``Σ w_all / Σ w_kept``, so each token's weights keep the sum they had (1 for models that
renormalise their top-k): the kept experts share the dropped mass in proportion to their weights.
Renormalising again later (llama.cpp's ``ffn_moe_weights_norm``) is then a no-op.

Two consequences for the runtime, which writes these arrays back in the evaluation callback:

- Both tensors must be rewritten. If only the ids are overwritten, llama.cpp gathers the
  redirected slot's weight from the router probabilities, gives it the top-1 expert's weight,
  and the top-1 expert is counted twice. The weights must be written where they are consumed
  (the node after any renormalisation, or one whose later renormalisation the zero survives).
- The top-1 slot is never dropped, so every token keeps at least one expert, and the redirect
  target is always a kept slot.

Any component that reads ids after the rewrite (importance, statistics) sees the duplicate; feed
them the router's original selection instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dymoe_gguf.errors import RuntimeConfigError


@dataclass(frozen=True)
class SkipConfig:
    """When a selected expert may be skipped."""

    # A slot is dropped when its weight is below this. 0 disables skipping.
    threshold: float = 0.0
    # If true, the threshold is a fraction of the token's top-1 weight instead of an absolute
    # weight: 0.1 drops experts weighted under a tenth of the strongest one.
    relative: bool = False

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise RuntimeConfigError(f"Expected a skip threshold >= 0, got {self.threshold}.")
        if self.relative and self.threshold > 1:
            raise RuntimeConfigError(
                f"Expected a relative skip threshold in [0, 1] (a fraction of the top-1 weight), got {self.threshold}."
            )


@dataclass(frozen=True, eq=False)
class SkipResult:
    """Rewritten routing of ``n`` tokens, ``k`` slots each."""

    ids: np.ndarray  # (n, k) int32: dropped slots hold the token's top-1 expert id
    weights: np.ndarray  # (n, k) float32: dropped slots 0, kept ones scaled to the old sum
    dropped: np.ndarray  # (n, k) bool: which slots were dropped

    @property
    def n_dropped(self) -> int:
        """Slots dropped over all tokens."""
        return int(np.count_nonzero(self.dropped))


def skip_slots(
    ids: np.ndarray,
    weights: np.ndarray,
    cfg: SkipConfig,
    *,
    droppable: np.ndarray | None = None,
) -> SkipResult:
    """Drop the low-weight slots of each token as described in the module docstring.

    ``ids`` (n, k) integer and ``weights`` (n, k) float, the router's selection and weights as
    the model applies them. ``droppable``, bool [E], limits skipping to some experts (e.g. the
    ones not resident, whose use would read storage); None lets any expert be dropped. The
    top-1 slot (highest weight; the first on ties) is never dropped. The inputs are not modified.
    """
    ids = np.asarray(ids)
    weights = np.asarray(weights, dtype=np.float32)
    if ids.ndim != 2 or weights.shape != ids.shape:
        raise ValueError(f"Expected ids and weights of one shape (tokens, k), got {ids.shape} and {weights.shape}.")
    n_tok = ids.shape[0]
    top1 = np.argmax(weights, axis=1)  # (n,)
    rows = np.arange(n_tok)
    if cfg.relative:
        limit = cfg.threshold * weights[rows, top1][:, None]  # (n, 1)
    else:
        limit = np.float32(cfg.threshold)
    dropped = weights < limit  # (n, k)
    dropped[rows, top1] = False
    if droppable is not None:
        dropped &= np.asarray(droppable, dtype=bool)[ids]
    if not dropped.any():
        return SkipResult(ids=ids.astype(np.int32, copy=True), weights=weights.copy(), dropped=dropped)

    top1_ids = ids[rows, top1]  # (n,)
    new_ids = np.where(dropped, top1_ids[:, None], ids).astype(np.int32)
    total = weights.sum(axis=1, keepdims=True, dtype=np.float64)  # (n, 1)
    kept = np.where(dropped, 0.0, weights.astype(np.float64))
    kept_total = kept.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(kept_total > 0, total / kept_total, 1.0)
    new_weights = (kept * scale).astype(np.float32)
    return SkipResult(ids=new_ids, weights=new_weights, dropped=dropped)
