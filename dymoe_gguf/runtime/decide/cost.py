"""The allocator's price list: what a miss costs in time, and what precision is worth.

For each expert, a step of the allocator (:mod:`.allocate`) is either *becoming resident* (at the
lowest tier) or *moving up one tier*. Their gains are priced here in one currency:

* **residency** saves, per token, ``p · (reads · latency + bytes₀ / bandwidth)`` seconds: ``p`` is the
  expert's selection probability (the frequency EMA), ``bytes₀`` its size at the lowest tier (what a
  miss reads) and ``reads`` the three matrices' reads. An expert left out is still read, at the
  lowest tier, when the router picks it: residency changes speed, never quality.
* **precision** (tier ``t-1 → t``) gains ``λ · m · (err[t-1] − err[t])``: ``m`` is the expert's gate
  mass (how much the output depends on it) and ``err`` a tier's relative quantisation error, taken as
  ``2^(−2·bits)`` (the mean squared error of a uniform quantiser; measured KL divergence on the
  shipped model follows it from Q2_K to Q4_K within 10 %).

``λ`` is the exchange rate between seconds and quality. It is set from the user's preference,
``prefer`` (``speed`` 0.25, ``balanced`` 1, ``quality`` 4, or a number), relative to the model's
own scales: with ``prefer = 1``, making every expert resident is worth as much as raising every
expert from the lowest to the highest tier. So the rate does not depend on the units, and the
measured bandwidth only shifts residency between experts of different sizes.

Per-layer plans (stock builds) use the same gains summed over a layer's experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dymoe_gguf.errors import RuntimeConfigError

PREFER = {"speed": 0.25, "balanced": 1.0, "quality": 4.0}
READS_PER_MISS = 3  # gate, up and down: one read each


def parse_prefer(value: str | float) -> float:
    """``speed`` | ``balanced`` | ``quality`` or a positive number -> the quality weight."""
    if isinstance(value, str) and value.strip().lower() in PREFER:
        return PREFER[value.strip().lower()]
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise RuntimeConfigError(f"Expected --prefer speed, balanced, quality or a number > 0, got {value!r}") from None
    if not weight > 0:
        raise RuntimeConfigError(f"Expected --prefer > 0, got {value!r}")
    return weight


@dataclass(frozen=True)
class CostModel:
    """Storage speed and the preference that price the allocator's steps."""

    tier_bits: tuple[float, ...]  # nominal bits per weight of each tier, low → high
    bandwidth: float = 500e6  # bytes/s the pager measured reading experts (a default until it has)
    latency: float = 1e-4  # seconds per read
    prefer: float = 1.0  # weight of quality against speed (PREFER)

    def errors(self) -> np.ndarray:
        """Relative quantisation error of each tier, float64 [T]."""
        return 2.0 ** (-2.0 * np.asarray(self.tier_bits, dtype=np.float64))

    def gains(self, freq: np.ndarray, mass: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Gain of each step, float64 [L, E, T], for ``freq`` and ``mass`` [L, E] and ``sizes`` [L, E, T]."""
        freq = np.maximum(np.asarray(freq, dtype=np.float64), 0.0)
        mass = np.maximum(np.asarray(mass, dtype=np.float64), 0.0)
        sizes = np.asarray(sizes, dtype=np.float64)
        n_tiers = sizes.shape[2]
        if len(self.tier_bits) != n_tiers:
            raise ValueError(f"Expected {n_tiers} tier_bits, got {len(self.tier_bits)}")
        saved = freq * (READS_PER_MISS * self.latency + sizes[..., 0] / self.bandwidth)  # s/token
        err = self.errors()
        step_quality = mass[..., None] * (err[:-1] - err[1:])  # [L, E, T-1]
        gain = np.empty(sizes.shape)
        gain[..., 0] = saved
        gain[..., 1:] = step_quality * self.rate(saved, mass, err)
        return gain

    def rate(self, saved: np.ndarray, mass: np.ndarray, err: np.ndarray) -> float:
        """λ: seconds per unit of quality, from the preference and the model's scales."""
        time_scale = float(saved.sum())
        quality_scale = float(mass.sum()) * float(err[0] - err[-1])
        if time_scale <= 0 or quality_scale <= 0:
            return self.prefer
        return self.prefer * time_scale / quality_scale
