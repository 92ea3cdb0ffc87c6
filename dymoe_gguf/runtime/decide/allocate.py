"""Budget allocator: which tier each expert gets, under a byte budget, a depth cap and pins.

Tiers are indexed low → high precision (e.g. 0 = Q2_K, 1 = Q4_K, 2 = Q8_0); ``-1`` means *not
resident*: the expert is left out of the budget, its pages may be evicted, and it is read from
storage (at the lowest tier) if the router picks it anyway.

**Value model.** An expert of importance ``s`` held at tier ``t`` is worth ``s · v[t]``, with
``v[-1] = 0`` and ``v`` non-decreasing (``cfg.tier_values``; by default ``v[t] = 2 − 2^−t``:
1, 1.5, 1.75 … — being resident counts most, as a miss stalls the token, and each precision step
halves the remaining quality gap). Reaching tier ``t`` from ``t − 1`` is a *step* that gains
``s · (v[t] − v[t−1])`` for ``sizes[t] − sizes[t−1]`` bytes; step 0 is becoming resident.

**Greedy by gain per byte.** All steps are ordered by gain per byte, best first (ties go to the
lower step, then to the earlier layer, then to the lower expert index). Where a step pays better
than the one before it (non-concave values), the two are pooled at their joint ratio, so an
expert's steps stay in order and are ranked by what they are worth together. Steps are taken in that
order while they fit; when one does not fit, the rest are scanned in order and each step whose
predecessor is held and that fits is taken (first fit). Resident bytes never exceed the budget.

**Depth cap.** In layer ``l`` at most ``⌊r(l) · E⌋`` experts may sit above the lowest tier
(:class:`.DepthSchedule`). The experts allowed are fixed before the greedy pass: the best by
gain per byte of their first upgrade. Pinned layers take their pinned tier and ignore the cap.

**Hysteresis.** With a ``current`` assignment, the steps an expert already holds count
``1 + cfg.promote_margin`` times their gain. A challenger therefore displaces an incumbent of the
same size (from a tier, from a cap slot, or from memory) only when its score exceeds the
incumbent's by that factor: this is "promote if score ≥ (1 + margin) · score of the weakest
expert at that tier". So when, between two calls with the same budget, no score's relative change
exceeds another's by a factor ``1 + margin`` (every score within ±10% of its last value, for the
default 0.25), the assignment is reproduced unchanged; a sustained change larger than that moves
it on the next call. A smaller budget still demotes (the lowest boosted ratios go first), so the
budget always holds. Feed it EMA scores (:mod:`.importance`): the EMA smooths, the margin stops
what jitter remains at the boundaries.

**Per-layer mode** (:func:`allocate_per_layer`, for builds that cannot mix types in one layer):
the items are whole layers: a step's gain is the layer's summed scores times ``v[t] − v[t−1]``,
its cost the summed bytes; precision steps (t ≥ 1) are further weighted by ``r(l) / r_max``, so
that the depth schedule, which cannot cap a share within a uniform layer, orders layers instead
(residency is not weighted: a miss stalls the token at any depth). The same greedy, ties to the
earlier layer. A layer with ``r(l) = 0`` stays at the lowest tier or out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime.decide.depth import DepthSchedule
from dymoe_gguf.runtime.decide.greedy import boost, greedy, pooled_ratio

NOT_RESIDENT = -1


@dataclass(frozen=True)
class AllocationConfig:
    """Value of each tier and how strongly the current assignment is kept."""

    # v[t] for tiers low → high; None: 2 − 2^−t (1, 1.5, 1.75, …) for however many tiers.
    tier_values: tuple[float, ...] | None = None
    # An incumbent's held steps count (1 + margin)× their gain: a challenger must be that much
    # more important to displace it. 0 disables hysteresis.
    promote_margin: float = 0.25

    def __post_init__(self) -> None:
        if not self.promote_margin >= 0:
            raise RuntimeConfigError(f"Expected promote_margin >= 0, got {self.promote_margin}.")
        if self.tier_values is not None:
            values = np.asarray(self.tier_values, dtype=np.float64)
            if values.ndim != 1 or values.size == 0 or values[0] < 0 or np.any(np.diff(values) < 0):
                raise RuntimeConfigError(
                    f"Expected tier_values non-negative and non-decreasing from low to high "
                    f"precision, got {self.tier_values}."
                )

    def values(self, n_tiers: int) -> np.ndarray:
        """v[0 … n_tiers − 1], float64."""
        if self.tier_values is None:
            return 2.0 - 0.5 ** np.arange(n_tiers, dtype=np.float64)
        if len(self.tier_values) != n_tiers:
            raise RuntimeConfigError(f"Expected {n_tiers} tier_values (one per tier), got {len(self.tier_values)}.")
        return np.asarray(self.tier_values, dtype=np.float64)


@dataclass(frozen=True)
class TierChange:
    """One expert moving between tiers (-1 = not resident)."""

    layer: int
    expert: int
    old: int
    new: int


@dataclass(frozen=True, eq=False)
class Assignment:
    """Tier per (layer, expert), -1 where not resident, and the resident bytes it implies."""

    tiers: np.ndarray  # (L, E) int8, read-only
    bytes: int  # resident expert bytes: Σ sizes[l, e, tiers[l, e]] over tiers >= 0

    def __post_init__(self) -> None:
        tiers = np.array(self.tiers, dtype=np.int8)
        if tiers.ndim != 2:
            raise ValueError(f"Expected tiers of shape (layers, experts), got {tiers.shape}.")
        if tiers.size and tiers.min() < NOT_RESIDENT:
            raise ValueError(f"Expected tiers >= {NOT_RESIDENT}, got {tiers.min()}.")
        tiers.setflags(write=False)
        object.__setattr__(self, "tiers", tiers)
        object.__setattr__(self, "bytes", int(self.bytes))

    @classmethod
    def from_tiers(cls, tiers: np.ndarray, sizes: np.ndarray) -> Assignment:
        """Assignment of ``tiers`` [L, E], its bytes counted from ``sizes`` [L, E, n_tiers]."""
        return cls(tiers=tiers, bytes=assignment_bytes(tiers, sizes))

    @classmethod
    def uniform(cls, tier: int, sizes: np.ndarray) -> Assignment:
        """Every expert at ``tier`` (e.g. the state right after loading the base GGUF)."""
        sizes = np.asarray(sizes)
        return cls.from_tiers(np.full(sizes.shape[:2], tier, dtype=np.int8), sizes)

    @property
    def n_layer(self) -> int:
        """L."""
        return self.tiers.shape[0]

    @property
    def n_expert(self) -> int:
        """E."""
        return self.tiers.shape[1]

    def diff(self, other: Assignment) -> list[TierChange]:
        """Changes going from this assignment to ``other`` (``old`` is ours, ``new`` theirs)."""
        self._check_same_shape(other)
        layers, experts = np.nonzero(self.tiers != other.tiers)
        return [
            TierChange(int(layer), int(expert), int(self.tiers[layer, expert]), int(other.tiers[layer, expert]))
            for layer, expert in zip(layers, experts, strict=True)
        ]

    def n_changes(self, other: Assignment) -> int:
        """How many experts change tier between this assignment and ``other``."""
        self._check_same_shape(other)
        return int(np.count_nonzero(self.tiers != other.tiers))

    def layer_tiers(self) -> np.ndarray | None:
        """Tier of each layer, int8 [L], when every layer is uniform; None otherwise."""
        first = self.tiers[:, :1]
        return self.tiers[:, 0].copy() if np.all(self.tiers == first) else None

    def _check_same_shape(self, other: Assignment) -> None:
        if other.tiers.shape != self.tiers.shape:
            raise ValueError(f"Expected assignments of one shape {self.tiers.shape}, got {other.tiers.shape}.")


def assignment_bytes(tiers: np.ndarray, sizes: np.ndarray) -> int:
    """Resident bytes of ``tiers`` [L, E] (−1 counts 0) given ``sizes`` [L, E, n_tiers]."""
    tiers = np.asarray(tiers, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    picked = np.take_along_axis(sizes, np.maximum(tiers, 0)[..., None], axis=2)[..., 0]
    return int(np.where(tiers >= 0, picked, 0).sum())


def captured_value(scores: np.ndarray, tiers: np.ndarray, cfg: AllocationConfig | None = None) -> float:
    """Σ scores · v[tier] (v[−1] = 0): the objective the allocator maximises greedily."""
    tiers = np.asarray(tiers, dtype=np.int64)
    cfg = cfg if cfg is not None else AllocationConfig()
    top = int(tiers.max()) + 1 if tiers.size else 0
    values = cfg.values(max(top, 1) if cfg.tier_values is None else len(cfg.tier_values))
    if top > values.size:
        raise ValueError(f"Expected tiers < {values.size} (one value each), got {top - 1}.")
    v = np.concatenate([[0.0], values])[tiers + 1]
    return float((np.asarray(scores, dtype=np.float64) * v).sum())


def _check_inputs(scores: np.ndarray, sizes: np.ndarray, budget: int) -> tuple[np.ndarray, ...]:
    scores = np.asarray(scores, dtype=np.float64)
    sizes = np.asarray(sizes)
    if scores.ndim != 2:
        raise ValueError(f"Expected scores of shape (layers, experts), got {scores.shape}.")
    if sizes.ndim != 3 or sizes.shape[:2] != scores.shape or sizes.shape[2] < 1:
        raise ValueError(f"Expected sizes of shape {(*scores.shape, 'n_tiers')}, got {sizes.shape}.")
    if not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"Expected integer byte sizes, got dtype {sizes.dtype}.")
    sizes = sizes.astype(np.int64)
    if np.any(sizes < 0) or np.any(np.diff(sizes, axis=2) < 0):
        raise ValueError(
            "Expected sizes >= 0 that do not shrink from low to high precision; are the tiers ordered low → high?"
        )
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("Expected finite, non-negative scores.")
    if budget < 0:
        raise RuntimeConfigError(f"Expected a byte budget >= 0, got {budget}.")
    return scores, sizes


def _check_gain(gain: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    gain = np.asarray(gain, dtype=np.float64)
    if gain.shape != shape or not np.all(np.isfinite(gain)) or np.any(gain < 0):
        raise ValueError(f"Expected finite, non-negative step gains of shape {shape}, got {gain.shape}.")
    return gain


def _check_current(current: Assignment | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The tiers held now (int64), for hysteresis; None without a current assignment."""
    if current is None:
        return None
    if current.tiers.shape != shape:
        raise ValueError(f"Expected a current assignment of shape {shape}, got {current.tiers.shape}.")
    return current.tiers.astype(np.int64)


def _pinned_tiers(schedule: DepthSchedule, sizes: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """Tier per expert of the pinned layers (``NOT_RESIDENT`` elsewhere) and their resident bytes,
    which the budget must hold."""
    tiers = np.full(sizes.shape[:2], NOT_RESIDENT, dtype=np.int64)
    for layer, tier in schedule.pins.items():
        tiers[layer] = tier
    pinned_bytes = assignment_bytes(tiers, sizes)
    if pinned_bytes > budget:
        raise RuntimeConfigError(
            f"Expected the budget ({budget} bytes) to hold the pinned layers, which need "
            f"{pinned_bytes} bytes; raise the budget or pin fewer layers / lower tiers."
        )
    return tiers, pinned_bytes


def allocate(
    scores: np.ndarray,
    sizes: np.ndarray,
    budget: int,
    schedule: DepthSchedule | None = None,
    *,
    current: Assignment | None = None,
    cfg: AllocationConfig | None = None,
    gain: np.ndarray | None = None,
) -> Assignment:
    """Tier per expert maximising Σ score · v[tier] greedily within ``budget`` resident bytes.

    ``scores`` [L, E] (e.g. :attr:`.ImportanceTracker.scores`), ``sizes`` [L, E, n_tiers] bytes
    per expert and tier (low → high precision), ``schedule`` the depth cap and pins,
    ``current`` the assignment in force (for hysteresis). See the module docstring.
    """
    scores, sizes = _check_inputs(scores, sizes, budget)
    schedule = schedule if schedule is not None else DepthSchedule()
    cfg = cfg if cfg is not None else AllocationConfig()
    n_layer, n_expert, n_tiers = sizes.shape
    schedule.check_pins(n_layer, n_tiers)

    cost = np.diff(sizes, axis=2, prepend=0)  # (L, E, T) bytes of each step
    if gain is None:  # the value model of the module docstring; .cost prices steps in time instead
        gain = scores[..., None] * np.diff(cfg.values(n_tiers), prepend=0.0)  # (L, E, T)
    gain = _check_gain(gain, sizes.shape)
    held = _check_current(current, scores.shape)
    if held is not None:
        gain = boost(gain, held, cfg.promote_margin)

    pinned = schedule.pin_array(n_layer) >= -1  # (L,)
    allowed = np.ones(sizes.shape, dtype=bool)
    allowed[pinned] = False
    if n_tiers > 1:
        # Depth cap: per layer, only the best ⌊r(l)·E⌋ experts by first-upgrade gain per byte
        # may leave the lowest tier. Stable sort: ties go to the lower expert index.
        first_upgrade = pooled_ratio(
            gain.reshape(-1, n_tiers), cost.reshape(-1, n_tiers), np.full(gain[..., 0].size, n_tiers)
        )[:, 1].reshape(n_layer, n_expert)
        rank = np.empty((n_layer, n_expert), dtype=np.int64)
        np.put_along_axis(
            rank,
            np.argsort(-first_upgrade, axis=1, kind="stable"),
            np.arange(n_expert)[None, :],
            axis=1,
        )
        capped = rank >= schedule.caps(n_layer, n_expert)[:, None]  # (L, E)
        allowed[..., 1:] &= ~capped[..., None]

    tiers, pinned_bytes = _pinned_tiers(schedule, sizes, budget)
    free = greedy(
        gain.reshape(-1, n_tiers),
        cost.reshape(-1, n_tiers),
        allowed.reshape(-1, n_tiers),
        budget - pinned_bytes,
    ).reshape(n_layer, n_expert)
    tiers = np.where(pinned[:, None], tiers, free)
    return Assignment.from_tiers(tiers, sizes)


def allocate_per_layer(
    scores: np.ndarray,
    sizes: np.ndarray,
    budget: int,
    schedule: DepthSchedule | None = None,
    *,
    current: Assignment | None = None,
    cfg: AllocationConfig | None = None,
    gain: np.ndarray | None = None,
) -> Assignment:
    """One tier per layer (all its experts alike) within ``budget``, for stock llama.cpp.

    Items are layers: gain ``Σ_e scores[l, e] · (v[t] − v[t−1])``, times ``r(l) / r_max`` for
    t ≥ 1; cost the summed expert bytes. Layers with ``r(l) = 0`` may not leave the lowest tier.
    Hysteresis boosts the steps up to the lowest tier each layer holds in ``current``.
    """
    scores, sizes = _check_inputs(scores, sizes, budget)
    schedule = schedule if schedule is not None else DepthSchedule()
    cfg = cfg if cfg is not None else AllocationConfig()
    n_layer, n_expert, n_tiers = sizes.shape
    schedule.check_pins(n_layer, n_tiers)

    shares = schedule.shares(n_layer)  # (L,)
    layer_sizes = sizes.sum(axis=1)  # (L, T)
    cost = np.diff(layer_sizes, axis=1, prepend=0)  # (L, T)
    # Residency is worth the same at any depth (a miss stalls the token wherever it happens);
    # precision steps are weighted by r(l) / r_max, 1 for the first layer.
    depth_weight = np.ones((n_layer, n_tiers))
    depth_weight[:, 1:] = (shares / schedule.r_max if schedule.r_max > 0 else 0.0)[:, None]
    if gain is None:
        gain = scores[..., None] * np.diff(cfg.values(n_tiers), prepend=0.0)
    gain = _check_gain(gain, sizes.shape).sum(axis=1) * depth_weight  # (L, T)
    held = _check_current(current, scores.shape)
    if held is not None:
        gain = boost(gain, held.min(axis=1), cfg.promote_margin)

    pins = schedule.pin_array(n_layer)
    pinned = pins >= -1
    allowed = np.ones((n_layer, n_tiers), dtype=bool)
    allowed[pinned] = False
    allowed[shares <= 0, 1:] = False
    _, pinned_bytes = _pinned_tiers(schedule, sizes, budget)
    layer_tier = greedy(gain, cost, allowed, budget - pinned_bytes)
    layer_tier = np.where(pinned, pins, layer_tier)
    tiers = np.repeat(layer_tier[:, None], n_expert, axis=1)
    return Assignment.from_tiers(tiers, sizes)
