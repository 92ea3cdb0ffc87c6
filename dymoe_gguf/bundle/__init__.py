"""The on-disk bundle: a stock-loadable base GGUF plus per-expert tier sidecars."""

from __future__ import annotations

from dymoe_gguf.bundle.format import (
    EXPERT_ALIGNMENT,
    FORMAT_VERSION,
    MATRICES,
    Tier,
    parse_tier,
    parse_tiers,
)
from dymoe_gguf.bundle.index import BundleIndex, ExpertSlice

__all__ = [
    "EXPERT_ALIGNMENT",
    "FORMAT_VERSION",
    "MATRICES",
    "BundleIndex",
    "ExpertSlice",
    "Tier",
    "parse_tier",
    "parse_tiers",
]
