"""Quality against speed at equal budgets: ``bench --sweeps``.

Each *point* is a policy plus runtime options (any :class:`~dymoe_gguf.runtime.config.RuntimeConfig`
field, passed to ``Controller.open``) at a budget given as a share of the model's Q4_K expert bytes.
For every point and share, two runs in their own processes:

* quality on the trained model (``models/tiny-moe``, calibrated copy): KL, top-1, perplexity against
  its F16 base, on held-out text;
* speed on the realistic synthetic model (calibrated copy): TPOT under a memory cap of budget +
  non-expert weights + the runtime allowance, cold cache.

Two tables come out of the same runs: **dynamic vs static vs uniform** (:data:`EQUAL_BUDGET`, rows ×
:data:`SHARES`) and the **Pareto front** of TPOT against KL (:data:`PARETO` ∪ :data:`EQUAL_BUDGET`, every
share; a point is on the front when no other point has both lower TPOT and lower KL). To sweep a new
runtime knob, add points here, e.g. ``Point("skip 0.05", options={"skip_threshold": 0.05})``; the
``prefer`` points (speed / balanced / quality, in both modes) choose that option's default.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARES = (0.25, 0.38, 0.50)  # budgets, as shares of the Q4_K expert bytes


@dataclass(frozen=True)
class Point:
    """One runtime configuration to place on the quality/speed plane."""

    label: str
    policy: str = "dymoe"
    options: dict[str, Any] = field(default_factory=dict)  # RuntimeConfig fields (mode, lookahead, …)

    def key(self) -> str:
        return json.dumps({"policy": self.policy, "options": self.options}, sort_keys=True)


EQUAL_BUDGET: list[Point] = [
    Point("dymoe (runtime importance)"),
    Point("static (calibration profile)", "static"),
    Point("uniform Q2_K", "uniform:Q2_K"),
    Point("uniform Q4_K", "uniform:Q4_K"),
]
PREFERS = ("speed", "balanced", "quality")  # the allocator's exchange rate (runtime/decide/cost.py)
PARETO: list[Point] = [
    *(Point(f"{mode}, prefer {pref}", options={"mode": mode, "prefer": pref})
      for mode in ("per-expert", "per-layer") for pref in PREFERS),
    Point("per-expert, no look-ahead", options={"mode": "per-expert", "lookahead": 0}),
    Point("per-layer, no look-ahead", options={"mode": "per-layer", "lookahead": 0}),
]


def points(patched: bool) -> list[Point]:
    """EQUAL_BUDGET then PARETO, without duplicates (same policy and options) and, on a stock build,
    without per-expert points."""
    seen, out = set(), []
    for p in EQUAL_BUDGET + PARETO:
        if not patched and p.options.get("mode") == "per-expert":
            continue
        if p.key() not in seen:
            seen.add(p.key())
            out.append(p)
    return out


def pareto_front(rows: list[dict]) -> set[int]:
    """Indices of the rows (``tpot_s``, ``kl``) no other row beats on both."""
    ok = [(i, r["tpot_s"], r["kl"]) for i, r in enumerate(rows) if r.get("tpot_s") is not None
          and r.get("kl") is not None]
    return {i for i, t, k in ok if not any((t2 <= t and k2 <= k) and (t2 < t or k2 < k) for _, t2, k2 in ok)}


def run_sweeps(*, trained: Path, text: Path, speed_bundle: Path, q4k_trained: int, q4k_speed: int,
               fixed_bytes: int, worker: Callable[[dict, int | None], dict], base_cfg: dict, patched: bool,
               chunks: int | None, threads: int, shares: tuple[float, ...] = SHARES,
               only: list[Point] | None = None, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every point at every share: one quality run and one capped speed run each.

    ``trained`` / ``speed_bundle``: calibrated copies; ``q4k_*``: their Q4_K expert bytes; ``fixed_bytes``:
    what the speed cap holds besides the budget (non-expert weights + runtime allowance); ``worker(cfg,
    cap)`` runs one configuration; ``base_cfg``: the speed runs' common worker settings; ``only``: these
    points instead of :func:`points`.
    """
    from dymoe_gguf.bench.models import model_files

    rows = []
    for share in shares:
        for p in only if only is not None else points(patched):
            q_budget, s_budget = int(share * q4k_trained), int(share * q4k_speed)
            row: dict[str, Any] = {"label": p.label, "policy": p.policy, "options": p.options, "share": share}
            log(f"sweep {100 * share:.0f}%: {p.label}")
            q = worker({"kind": "quality", "name": p.label, "model": str(trained), "text": str(text), "ctx": 256,
                        "chunks": chunks, "threads": threads, "policy": p.policy, "options": p.options,
                        "budget": q_budget}, None)
            s = worker(dict(base_cfg, kind="dymoe", name=p.label, model=str(speed_bundle), policy=p.policy,
                            options=p.options, budget=s_budget,
                            files=[str(f) for f in model_files(speed_bundle, stock=False)]), s_budget + fixed_bytes)
            row |= {"kl": q.get("kl"), "top1": q.get("top1"), "ppl": q.get("ppl"), "quality_ok": bool(q.get("ok")),
                    "quality_error": None if q.get("ok") else q.get("error"), "tpot_s": s.get("tpot_s"),
                    "speed_ok": bool(s.get("ok")), "speed_error": None if s.get("ok") else s.get("error"),
                    "cap_bytes": s_budget + fixed_bytes, "budget_speed": s_budget, "budget_quality": q_budget,
                    "hit_rate": (s.get("controller") or {}).get("hit_rate"),
                    "callback_share": s.get("callback_share")}
            rows.append(row)
    front = pareto_front(rows)
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return {"shares": list(shares), "equal_budget": [p.label for p in EQUAL_BUDGET], "rows": rows,
            "trained": str(trained), "speed_bundle": str(speed_bundle), "chunks": chunks}
