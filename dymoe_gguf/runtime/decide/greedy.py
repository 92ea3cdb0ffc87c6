"""The allocator's solver: greedy steps by gain per byte under a byte budget (pure numpy).

Items (experts, or layers) climb tiers one step at a time; step ``t`` takes an item from tier
``t − 1`` to ``t`` (step 0: from not resident to the lowest tier). :func:`greedy` takes steps in
order of gain per byte, pooled by :func:`pooled_ratio` where an item's later step pays better than
an earlier one, then fills what budget is left first-fit. See :mod:`.allocate` for the models.
"""

from __future__ import annotations

import numpy as np


def pooled_ratio(gain: np.ndarray, cost: np.ndarray, n_allowed: np.ndarray) -> np.ndarray:
    """Gain per byte of each step, pooled so that it never rises along an item's steps, (N, T).

    Where a step pays better than the one before it (non-concave tier values), the two only
    make sense together: their pooled ratio is Σ gain / Σ cost (the slope of the concave
    majorant of the item's bytes → value curve). Computed by the min–max formula of antitonic
    regression, ``r(t) = min_{i ≤ t} max_{j ≥ t} avg(i … j)``, over the first ``n_allowed`` steps
    of each item only. Free steps (no bytes) pay infinitely well.
    """
    n_items, n_tiers = gain.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        plain = np.where(cost > 0, gain / np.where(cost > 0, cost, 1), np.inf)
    allowed_step = np.arange(n_tiers)[None, :] < np.asarray(n_allowed)[:, None]
    plain = np.where(allowed_step, plain, -np.inf)
    with np.errstate(invalid="ignore"):  # -inf - -inf past the allowed steps: nan, not a rise
        rises = (np.diff(plain, axis=1) > 0).any(axis=1)
    if not rises.any():  # concave everywhere: nothing to pool (the common case; pooling is the costly part)
        return plain
    if not rises.all():
        plain[rises] = pooled_ratio(gain[rises], cost[rises], np.asarray(n_allowed)[rises])
        return plain
    zero = np.zeros((n_items, 1))
    cum_gain = np.concatenate([zero, np.cumsum(gain, axis=1)], axis=1)  # (N, T + 1)
    cum_cost = np.concatenate([zero, np.cumsum(cost, axis=1)], axis=1)
    d_cost = cum_cost[:, None, 1:] - cum_cost[:, :-1, None]  # (N, i, j): steps i … j together
    d_gain = cum_gain[:, None, 1:] - cum_gain[:, :-1, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = np.where(d_cost > 0, d_gain / np.where(d_cost > 0, d_cost, 1), np.inf)
    i, j = np.arange(n_tiers)[:, None], np.arange(n_tiers)[None, :]
    # never pool with a barred step; i > j is no run of steps
    avg = np.where((j >= i) & (j < np.asarray(n_allowed)[:, None, None]), avg, -np.inf)
    tail_max = np.maximum.accumulate(avg[:, :, ::-1], axis=2)[:, :, ::-1]  # (N, i, t): max over j >= t
    pooled = np.where(i <= j, tail_max, np.inf).min(axis=1)  # (N, t): min over i <= t
    return pooled


def greedy(gain: np.ndarray, cost: np.ndarray, allowed: np.ndarray, budget: int) -> np.ndarray:
    """Greedy steps by gain per byte under ``budget``; returns the tier per item, int64 [N].

    ``gain``, ``cost`` (N, T): step ``t`` of an item takes it from tier ``t − 1`` to ``t``.
    ``allowed`` (N, T) bool, made prefix-closed here.
    """
    n_items, n_tiers = gain.shape
    allowed = np.logical_and.accumulate(allowed, axis=1)
    ratio = pooled_ratio(gain, cost, allowed.sum(axis=1))  # non-increasing along steps
    items, steps = np.nonzero(allowed)  # row-major: items ascending, then steps
    order = np.lexsort((items, steps, -ratio[items, steps]))  # last key is the primary one
    items, steps = items[order], steps[order]
    step_cost = cost[items, steps]
    cumulative = np.cumsum(step_cost)
    n_prefix = int(np.searchsorted(cumulative, budget, side="right"))
    tiers = np.bincount(items[:n_prefix], minlength=n_items).astype(np.int64) - 1
    remaining = budget - (int(cumulative[n_prefix - 1]) if n_prefix else 0)
    # First fit over the rest, in order. Only steps whose predecessor is held can be taken, and
    # the budget only shrinks, so one pass in order suffices.
    rest = np.arange(n_prefix, items.size)
    while rest.size:
        fits = (step_cost[rest] <= remaining) & (tiers[items[rest]] == steps[rest] - 1)
        first = int(np.argmax(fits))
        if not fits[first]:
            break
        taken = rest[first]
        tiers[items[taken]] = steps[taken]
        remaining -= int(step_cost[taken])
        rest = rest[first + 1 :]
    return tiers


def boost(gain: np.ndarray, held: np.ndarray, margin: float) -> np.ndarray:
    """Multiply the gain of the steps each item holds (``t <= held``) by ``1 + margin``."""
    held_steps = np.arange(gain.shape[-1]) <= held[..., None]
    return np.where(held_steps, gain * (1.0 + margin), gain)
