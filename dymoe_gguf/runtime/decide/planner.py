"""The plan: which tier each expert of each MoE layer is read at, from the policy (pure numpy).

The planner owns the importance tracker, the depth schedule and the current assignment. It turns
them into *view tiers* ``[n_moe_layers, n_expert]``: the tier index each expert reads (``BASE`` =
the base file's own copy, only under the ``manual`` policy), and into the *kept* tiers the pager
holds resident (``NOT_RESIDENT`` where an expert is left to storage; it is then read at its view
tier, the lowest one, when the router picks it).

Policies: ``dymoe`` re-plans from running importance; ``static`` plans once from the calibration
profile and freezes it; ``uniform`` puts every expert at one tier; ``manual`` takes the tiers given
to :meth:`Planner.set_manual`; ``observe`` plans nothing (the base copy is read).
"""

from __future__ import annotations

import numpy as np

from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime.decide.allocate import (
    NOT_RESIDENT,
    AllocationConfig,
    Assignment,
    allocate,
    allocate_per_layer,
)
from dymoe_gguf.runtime.decide.depth import DepthSchedule
from dymoe_gguf.runtime.decide.importance import ImportanceTracker

BASE = -2  # view tier meaning "the base file's own copy" (manual policy, or nothing planned)


class Planner:
    """Plans tiers for ``sizes`` [n_moe_layers, n_expert, n_tiers] bytes per expert copy."""

    def __init__(self, sizes: np.ndarray, importance: ImportanceTracker, schedule: DepthSchedule, *,
                 budget: int | None, per_layer: bool, uniform_tier: int | None = None, manual: bool = False,
                 alloc: AllocationConfig | None = None) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.importance = importance
        self.schedule = schedule
        self.budget = budget
        self.per_layer = per_layer  # stock llama.cpp: one tier per layer
        self.uniform_tier = uniform_tier
        self.manual: np.ndarray | None = (
            np.full(self.sizes.shape[:2], BASE, dtype=np.int16) if manual else None
        )
        self.alloc = alloc if alloc is not None else AllocationConfig()
        self.assignment: Assignment | None = None
        self.view_tiers = np.full(self.sizes.shape[:2], BASE, dtype=np.int16)  # [Lm, E]
        self.tier_changes = 0  # planned tier changes (per expert) since the first plan

    @property
    def effective_budget(self) -> int:
        """The budget the allocator plans for (everything at the top tier when unlimited)."""
        return self.budget if self.budget is not None else int(self.sizes[..., -1].sum()) + 1

    @property
    def kept(self) -> np.ndarray:
        """Tier the pager keeps resident per (MoE layer, expert), ``NOT_RESIDENT`` where none."""
        if self.assignment is None:
            return np.full(self.sizes.shape[:2], NOT_RESIDENT, dtype=np.int16)
        return self.assignment.tiers.astype(np.int16)

    def replan(self) -> None:
        """Plan from the current importance (and at attach); updates :attr:`view_tiers`."""
        if self.manual is not None:
            new = Assignment.from_tiers(np.maximum(self.manual, NOT_RESIDENT).astype(np.int64), self.sizes)
        elif self.uniform_tier is not None:
            new = Assignment.uniform(self.uniform_tier, self.sizes)
        else:
            alloc = allocate_per_layer if self.per_layer else allocate
            new = alloc(self.importance.scores, self.sizes, self.effective_budget, self.schedule,
                        current=self.assignment, cfg=self.alloc)
        if self.assignment is not None:
            self.tier_changes += new.n_changes(self.assignment)
        self.assignment = new
        if self.manual is not None:
            self.view_tiers = self.manual.copy()
        else:  # not kept: read at the lowest tier when the router picks it anyway
            self.view_tiers = np.maximum(new.tiers, 0).astype(np.int16)

    def set_manual(self, tiers: np.ndarray) -> None:
        """Manual policy: ``tiers`` [n_moe_layers, n_expert], tier indices or ``BASE`` (takes effect
        at the next :meth:`replan`)."""
        if self.manual is None:
            raise RuntimeConfigError("set_tiers() needs policy 'manual'")
        tiers = np.asarray(tiers, dtype=np.int16)
        n_tiers = self.sizes.shape[2]
        if tiers.shape != self.sizes.shape[:2] or tiers.min() < BASE or tiers.max() >= n_tiers:
            raise RuntimeConfigError(f"Expected tiers of shape {self.sizes.shape[:2]} in [{BASE}, {n_tiers - 1}]")
        if self.per_layer and any(len(set(row.tolist())) > 1 for row in tiers):
            raise RuntimeConfigError("Per-layer views (stock llama.cpp) need one tier per layer")
        self.manual = tiers.copy()

    def layer_tier(self, moe_index: int) -> int:
        """Per-layer views: the one tier a layer reads (its highest planned tier; BASE if any expert is)."""
        row = self.view_tiers[moe_index]
        return BASE if row.min() == BASE else int(row.max())

