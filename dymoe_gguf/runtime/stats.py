"""What the controller measures, and the snapshot ``Controller.stats()`` returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dymoe_gguf._native import vm
from dymoe_gguf.runtime.decide import LookaheadStats


@dataclass(frozen=True)
class ControllerStats:
    """A snapshot of the controller's measurements (``to_dict()`` for JSON)."""

    mode: str  # "per-layer" | "per-expert" | "off"
    policy: str
    tokens: int  # tokens processed (prompt and generated)
    steps: int  # decode calls
    lookahead_recall: float | None  # share of next-layer selected experts that were predicted
    lookahead_recall_by_layer: list[float | None]
    lookahead_precision: float | None  # share of predicted experts that were then selected
    prefetch_on: bool | None  # the prefetch trial's state: on while it measurably speeds decoding up
    tier_changes: int  # changes of planned tier (per expert) since open
    view_changes: int  # tensor view swaps applied
    resident_expert_bytes: int  # measured with mincore now
    max_resident_expert_bytes: int  # highest the pager measured
    budget_bytes: int | None
    bytes_read: int | None  # from storage by this process since open (vm.read_bytes); None: the OS does not say
    hit_rate: float | None  # selected experts already resident when selected
    hit_rate_by_layer: list[float | None]
    skipped_slots: int
    lowered_batches: int  # layer batches read at the lowest tier because their planned tiers exceeded the budget
    hot_path: str  # where the per-layer safe point runs: "native" (C, patches/0003), "python" (eval callback)
    callback_calls: int  # eval-callback calls (python), or C hook calls (native)
    callback_seconds: float  # time the safe point cost: the callback (python), or hooks + per-decode drain (native)
    miss_seconds: float  # of which (native: besides which) reading missing experts at the safe point
    callback_error: str | None  # the first exception raised inside the eval callback, if any
    # tier each expert of each MoE layer reads (index into tier_names; -2 = the base file's copy)
    tiers_by_layer: list[list[int]] = field(default_factory=list)
    tier_names: list[str] = field(default_factory=list)
    pager: dict = field(default_factory=dict)
    # per MoE layer: moving average of its look-ahead recall, and whether prefetch for it is on
    lookahead_recall_recent: list[float] = field(default_factory=list)
    lookahead_prefetching: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class StatsCounter:
    """Mutable counters updated on the callback thread."""

    def __init__(self, n_moe_layers: int, lookahead: int) -> None:
        self.tokens = 0
        self.steps = 0
        self.skipped = 0
        self.lowered_batches = 0  # layer batches read at the lowest tier to fit the budget
        self.hits = np.zeros(n_moe_layers, dtype=np.int64)
        self.uses = np.zeros(n_moe_layers, dtype=np.int64)
        self.lookahead = LookaheadStats(n_moe_layers, max(1, lookahead))
        self._read0 = vm.read_bytes()

    def start(self) -> None:
        """Zero the counters after set-up (warm-up decode, initial warming are not counted)."""
        self._read0 = vm.read_bytes()

    def bytes_read(self) -> int | None:
        """Bytes read from storage since :meth:`start`; None where the platform does not count them."""
        now = vm.read_bytes()
        return None if now is None or self._read0 is None else now - self._read0

    def snapshot(self, ctl) -> ControllerStats:
        """The stats of controller ``ctl`` now."""
        views, pager, observer, index, step = ctl.views, ctl.pager, ctl.observer, ctl.index, ctl.step
        mode = "off" if ctl.cfg.policy == "off" else ctl.mode
        if ctl.native is not None:
            ctl.native.drain()  # first: the tokens since the last drain count in every field below
        recall = float(self.lookahead.recall_by_distance[0])  # next layer only; NaN before any update
        by_layer = [None if np.isnan(x) else float(x) for x in self.lookahead.recall_table[:, 0]]
        with np.errstate(invalid="ignore", divide="ignore"):
            hit_layer = [float(h / u) if u else None for h, u in zip(self.hits, self.uses)]
        resident = pager.resident_bytes() if pager is not None else 0
        calls, seconds = (observer.calls, observer.seconds) if observer is not None else (0, 0.0)
        miss = pager.stats.demand_seconds if pager is not None else 0.0
        if ctl.native is not None:
            calls, (seconds, miss) = ctl.native.hot.times()[0], ctl.native.seconds()
        ps = asdict(pager.stats) if pager is not None else {}
        planner = step.planner if step is not None else None
        gate = step.gate if step is not None else None
        return ControllerStats(
            mode=mode, policy=ctl.cfg.policy_name, tokens=self.tokens, steps=self.steps,
            lookahead_recall=None if np.isnan(recall) else recall,
            lookahead_recall_by_layer=by_layer,
            lookahead_precision=None if np.isnan(self.lookahead.precision) else float(self.lookahead.precision),
            prefetch_on=bool(step.trial.on) if step is not None and ctl.pager is not None else None,
            tier_changes=planner.tier_changes if planner is not None else 0,
            view_changes=views.changes if views is not None else 0,
            resident_expert_bytes=int(resident), max_resident_expert_bytes=int(ps.get("max_resident", resident)),
            budget_bytes=ctl.cfg.budget, bytes_read=self.bytes_read(),
            hit_rate=float(self.hits.sum() / self.uses.sum()) if self.uses.sum() else None,
            hit_rate_by_layer=hit_layer, skipped_slots=self.skipped,
            lowered_batches=self.lowered_batches,
            hot_path="native" if ctl.native is not None else "python",
            callback_calls=calls, callback_seconds=round(seconds, 6), miss_seconds=round(miss, 6),
            callback_error=repr(observer.error) if observer is not None and observer.error else None,
            tiers_by_layer=planner.view_tiers.tolist() if planner is not None else [],
            tier_names=[t.name for t in index.tiers], pager=ps,
            lookahead_recall_recent=[round(float(x), 4) for x in gate.recent] if gate is not None else [],
            lookahead_prefetching=[bool(x) for x in gate.on] if gate is not None else [],
        )
