"""Policy: from observed routing to a tier per expert. Pure numpy, no llama.cpp, no I/O but traces.

- :mod:`.trace`       recorded routing and its statistics
- :mod:`.importance`  EMA importance per (layer, expert)
- :mod:`.depth`       share of high-precision experts per layer, pins
- :mod:`.allocate`    tiers under a byte budget, with hysteresis; per-expert or per-layer
- :mod:`.skip`        DyMoE "4/0" skipping of low-weight slots
- :mod:`.lookahead`   router-on-hidden prediction of the next layers' experts, its recall, the prefetch gate
- :mod:`.planner`     the policy's plan: view tier and kept tier per expert
"""

from __future__ import annotations

from dymoe_gguf.runtime.decide.allocate import (
    NOT_RESIDENT,
    AllocationConfig,
    Assignment,
    TierChange,
    allocate,
    allocate_per_layer,
    assignment_bytes,
    captured_value,
)
from dymoe_gguf.runtime.decide.depth import DEPTH_KINDS, DepthKind, DepthSchedule
from dymoe_gguf.runtime.decide.importance import (
    ImportanceConfig,
    ImportanceProfile,
    ImportanceTracker,
)
from dymoe_gguf.runtime.decide.lookahead import (
    LookaheadStats,
    Predictor,
    PrefetchGate,
    count_hits,
    predict,
    recall,
)
from dymoe_gguf.runtime.decide.planner import BASE, Planner
from dymoe_gguf.runtime.decide.skip import SkipConfig, SkipResult, skip_slots
from dymoe_gguf.runtime.decide.trace import (
    RoutingTrace,
    expert_load,
    gate_mass,
    normalized_entropy,
    popularity_recall,
    transition_predictability,
)

__all__ = [
    "BASE",
    "Planner",
    "Predictor",
    "PrefetchGate",
    "DEPTH_KINDS",
    "NOT_RESIDENT",
    "AllocationConfig",
    "Assignment",
    "DepthKind",
    "DepthSchedule",
    "ImportanceConfig",
    "ImportanceProfile",
    "ImportanceTracker",
    "LookaheadStats",
    "RoutingTrace",
    "SkipConfig",
    "SkipResult",
    "TierChange",
    "allocate",
    "allocate_per_layer",
    "assignment_bytes",
    "captured_value",
    "count_hits",
    "expert_load",
    "gate_mass",
    "normalized_entropy",
    "popularity_recall",
    "predict",
    "recall",
    "skip_slots",
    "transition_predictability",
]
