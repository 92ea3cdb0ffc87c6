"""``bench --sweeps``: every point's quality (trained model) and capped speed (synthetic), tables, front, plot."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from dymoe_gguf.bench import report
from dymoe_gguf.bench.routing import calibrated_copy
from dymoe_gguf.bench.run import non_expert_bytes, q4k_expert_bytes
from dymoe_gguf.bench.runner import run_worker
from dymoe_gguf.bench.sweeps import EQUAL_BUDGET, PARETO, Point, pareto_front, points, run_sweeps
from dymoe_gguf.bundle.format import Tier

from .test_bench import RECORDED, TINY, _recorded

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-moe"
MiB = 1 << 20


def test_pareto_front_and_points():
    rows = [{"tpot_s": 1.0, "kl": 0.1}, {"tpot_s": 2.0, "kl": 0.05}, {"tpot_s": 2.5, "kl": 0.2},
            {"tpot_s": None, "kl": 0.01}, {"tpot_s": 1.0, "kl": 0.1}]
    assert pareto_front(rows) == {0, 1, 4}  # 2 is beaten by 0 on both; ties are both on the front
    assert points(True)[: len(EQUAL_BUDGET)] == EQUAL_BUDGET
    assert len(points(True)) == len({p.key() for p in EQUAL_BUDGET + PARETO})
    assert all(p.options.get("mode") != "per-expert" for p in points(False))


def test_prefer_points_in_both_modes_and_their_table():
    """The sweep places every ``prefer`` value in per-expert and per-layer mode (the default's evidence)."""
    from dymoe_gguf.bench.sweeps import PREFERS
    from dymoe_gguf.bench.tables import prefer_table
    from dymoe_gguf.runtime.decide import PREFER

    assert set(PREFERS) == set(PREFER)
    opts = [p.options for p in points(True)]
    for mode in ("per-expert", "per-layer"):
        for pref in PREFERS:
            assert {"mode": mode, "prefer": pref} in opts
    assert {"mode": "per-layer", "prefer": "speed"} in [p.options for p in points(False)]
    row = {"quality_ok": True, "speed_ok": True, "kl": 0.01, "tpot_s": 0.02}
    rows = [dict(row, options={"mode": m, "prefer": p}, share=s) for m in ("per-expert", "per-layer")
            for p in PREFERS for s in (0.25, 0.5)]
    rows.append(dict(row, options={"mode": "per-expert", "lookahead": 0}, share=0.25))  # not a prefer point
    rows[0] = dict(rows[0], speed_ok=False)
    lines = prefer_table(rows, [0.25, 0.5])
    assert sum(line.startswith("| ") for line in lines) == 1 + 6  # header + 3 prefers x 2 modes
    assert "| speed | per-expert | failed | 0.0100 / 20.0 |" in lines
    assert prefer_table([dict(row, options={}, share=0.25)], [0.25]) == []


@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="models/tiny-moe is not in this checkout")
def test_sweeps_run_render_and_plot(tmp_path, bundle):
    """Real runs: the trained model (quality) and a tiny synthetic one (speed), both calibrated copies."""
    from dymoe_gguf.convert import convert

    text = ROOT / "data" / "calibration.txt"
    trained = tmp_path / "trained.dymoe"
    convert(MODEL, trained, base_tier=Tier.F16, tiers=(Tier.Q2_K, Tier.Q4_K, Tier.Q8_0), threads=2)
    t_cal, _ = calibrated_copy(trained, text, tmp_path / "t-cal.dymoe", chunks=2)
    speed = bundle("olmoe", base_tier=Tier.Q4_K, **TINY)
    s_cal, _ = calibrated_copy(speed, text, tmp_path / "s-cal.dymoe", chunks=2)
    assert (t_cal / "calibration.gguf").is_file() and not (trained / "calibration.gguf").exists()
    only = [Point("dymoe"), Point("static", "static"), Point("uniform Q2_K", "uniform:Q2_K"),
            Point("no look-ahead", options={"lookahead": 0})]
    base = {"tokens": 8, "prompt_tokens": 8, "threads": 2, "seed": 0, "n_ctx": 64}
    sw = run_sweeps(trained=t_cal, text=ROOT / "data" / "heldout.txt", speed_bundle=s_cal,
                    q4k_trained=q4k_expert_bytes(t_cal), q4k_speed=q4k_expert_bytes(s_cal),
                    fixed_bytes=non_expert_bytes(s_cal) + 96 * MiB, worker=lambda c, cap: run_worker(c, cap, 300),
                    base_cfg=base, patched=True, chunks=2, threads=2, shares=(0.5,), only=only)
    rows = {r["label"]: r for r in sw["rows"]}
    assert list(rows) == ["dymoe", "static", "uniform Q2_K", "no look-ahead"]
    for r in rows.values():
        assert r["quality_ok"] and r["speed_ok"], r
        assert r["kl"] >= 0 and 0 < r["top1"] <= 1 and r["tpot_s"] > 0 and r["share"] == 0.5
        assert r["budget_quality"] == int(0.5 * q4k_expert_bytes(t_cal))
    assert any(r["pareto"] for r in rows.values())
    assert rows["uniform Q2_K"]["kl"] > rows["dymoe"]["kl"]  # half the Q4_K bytes spent on importance beats Q2_K
    res = copy.deepcopy(_recorded()) | {"sweeps": sw | {"equal_budget": ["dymoe", "static", "uniform Q2_K"]}}
    md = report.render_markdown(res)
    assert "### Dynamic vs static vs uniform at equal budgets" in md and "### Pareto front" in md
    assert md.count("●") == sum(r["pareto"] for r in rows.values())
    files = report.write_all(res, tmp_path / "out")
    pytest.importorskip("matplotlib")
    assert files["pareto"].stat().st_size > 1000
    assert RECORDED.get("sweeps") is None  # the recorded fixture itself was not changed
