"""Depth schedule: how large a share of each layer's experts may run above the lowest tier.

Early layers of an MoE are more sensitive to quantisation error than late ones (DyMoE, arXiv
2603.19172): an error made early is carried and amplified by every later layer. The schedule
r(l) in [0, 1] is the share of the experts of layer ``l`` that the allocator may place above the
lowest tier; it falls with depth:

- ``cosine``   r(l) = r_min + (r_max − r_min) · (1 + cos(π · l / (L − 1))) / 2   (DyMoE's curve:
  flat near both ends, steepest in the middle)
- ``linear``   r(l) = r_max + (r_min − r_max) · l / (L − 1)
- ``constant`` r(l) = r_max

With one layer, r(0) = r_max. ``pins`` override the schedule for whole layers: ``{0: 2}`` keeps
every expert of layer 0 at tier 2 (e.g. Q8_0) whatever its importance and the budget; ``{l: -1}``
keeps layer ``l`` out of memory (streamed from storage when used). Tier indices are checked
against the tier count by the allocator, which is the first to know it.

A schedule knows nothing of bytes or scores; the allocator turns it into per-layer caps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

from dymoe_gguf.errors import RuntimeConfigError

DepthKind = Literal["cosine", "linear", "constant"]
DEPTH_KINDS: tuple[str, ...] = ("cosine", "linear", "constant")

# Lowest tier index a pin may name: -1 means "not resident".
NOT_RESIDENT = -1


@dataclass(frozen=True)
class DepthSchedule:
    """Share r(l) of high-precision experts per layer, falling with depth, plus layer pins."""

    kind: DepthKind = "cosine"
    # Share allowed above the lowest tier in the first layer. 0.5 leaves half of every early layer
    # at the lowest tier, so the budget is spent where the router puts its mass.
    r_max: float = 0.5
    # Share allowed in the last layer: small but not zero, so a very hot late expert can still be
    # promoted.
    r_min: float = 0.125
    # {layer: tier} for whole layers that ignore the schedule, importance and (for the pinned
    # bytes) the competition; -1 pins a layer out of memory.
    pins: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DEPTH_KINDS:
            raise RuntimeConfigError(f"Expected a depth schedule kind in {DEPTH_KINDS}, got {self.kind!r}.")
        for name in ("r_max", "r_min"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise RuntimeConfigError(f"Expected {name} to be a share in [0, 1], got {value!r}.")
        if self.r_min > self.r_max:
            raise RuntimeConfigError(
                f"Expected r_min <= r_max (the share falls with depth), got r_min={self.r_min} "
                f"and r_max={self.r_max}; swap them."
            )
        pins: dict[int, int] = {}
        for layer, tier in dict(self.pins).items():
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
                raise RuntimeConfigError(f"Expected pinned layers to be indices >= 0, got {layer!r}.")
            if isinstance(tier, bool) or not isinstance(tier, (int, np.integer)):
                raise RuntimeConfigError(f"Expected layer {layer} to be pinned to a tier index, got {tier!r}.")
            if tier < NOT_RESIDENT:
                raise RuntimeConfigError(
                    f"Expected layer {layer} pinned to a tier >= {NOT_RESIDENT} (-1 = not resident), got {tier}."
                )
            pins[int(layer)] = int(tier)
        # Read-only copy: a frozen schedule must not change through the caller's dict.
        object.__setattr__(self, "pins", MappingProxyType(pins))

    def __hash__(self) -> int:
        return hash((self.kind, self.r_max, self.r_min, tuple(sorted(self.pins.items()))))

    def shares(self, n_layer: int) -> np.ndarray:
        """r(l) for ``l = 0 … n_layer − 1``, float64 in [r_min, r_max], non-increasing.

        Pins do not change the shares: they are applied by the allocator.
        """
        if n_layer < 1:
            raise ValueError(f"Expected n_layer >= 1, got {n_layer}.")
        if n_layer == 1 or self.kind == "constant":
            return np.full(n_layer, self.r_max, dtype=np.float64)
        x = np.arange(n_layer, dtype=np.float64) / (n_layer - 1)  # 0 … 1
        if self.kind == "cosine":
            shape = (1.0 + np.cos(math.pi * x)) / 2.0  # 1 … 0
        else:  # linear
            shape = 1.0 - x
        shares = self.r_min + (self.r_max - self.r_min) * shape
        # r_min + (r_max − r_min) can differ from r_max in the last bit (0.04 + 0.07 ≠ 0.11).
        shares[0] = self.r_max
        return shares

    def caps(self, n_layer: int, n_expert: int) -> np.ndarray:
        """Most experts of each layer that may sit above the lowest tier: ⌊r(l) · E⌋, int64 [L].

        A small epsilon keeps shares such as 0.3 · 10 from rounding down to 2. Pinned layers
        report their schedule cap too; the allocator ignores it for them.
        """
        if n_expert < 1:
            raise ValueError(f"Expected n_expert >= 1, got {n_expert}.")
        return np.floor(self.shares(n_layer) * n_expert + 1e-9).astype(np.int64)

    def check_pins(self, n_layer: int, n_tiers: int) -> None:
        """Raise :class:`RuntimeConfigError` if a pin names a layer or tier the model lacks."""
        for layer, tier in self.pins.items():
            if layer >= n_layer:
                raise RuntimeConfigError(
                    f"Expected pinned layers < {n_layer} (the model's MoE layer count), got layer {layer}."
                )
            if tier >= n_tiers:
                raise RuntimeConfigError(
                    f"Expected layer {layer} pinned to a tier < {n_tiers} (tiers are 0 … "
                    f"{n_tiers - 1}, low to high precision, -1 = not resident), got {tier}."
                )

    def pin_array(self, n_layer: int) -> np.ndarray:
        """Pinned tier per layer, int64 [L], with -2 where a layer is not pinned."""
        out = np.full(n_layer, -2, dtype=np.int64)
        for layer, tier in self.pins.items():
            if layer < n_layer:
                out[layer] = tier
        return out
