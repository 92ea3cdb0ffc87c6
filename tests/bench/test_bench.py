"""``dymoe-gguf bench``: worker, cgroup cap, killed and crashed configurations, report (tiny models, no timing
asserts)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dymoe_gguf.bench import cgroup, report
from dymoe_gguf.bench.compare import add_bounds, add_ratios, headline
from dymoe_gguf.bench.configs import BenchOptions
from dymoe_gguf.bench.models import BenchModel, model_files
from dymoe_gguf.bench.run import run_bench
from dymoe_gguf.bench.runner import run_worker
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import Tier

MiB = 1 << 20
TINY = {"n_layer": 2, "d": 256, "ff": 256, "n_expert": 8, "top_k": 2, "n_head": 4}
SPEED_FIELDS = ("ttft_s", "tpot_s", "load_s", "prompt_s", "peak_rss", "ru_maxrss", "resident_model_bytes",
                "bytes_read_decode", "bytes_per_token", "major_faults_decode", "major_faults_per_token", "step_s")


@pytest.fixture(scope="module")
def tiny(bundle) -> Path:
    return bundle("olmoe", base_tier=Tier.Q4_K, **TINY)


def _has_patch() -> bool:
    from dymoe_gguf.bench.machine import patch_available

    return patch_available()


def _cfg(tiny: Path, **kw) -> dict:
    stock = kw.get("kind", "stock") == "stock"
    files = model_files(tiny, stock=stock)
    cfg = {"kind": "stock", "model": str(files[0]) if stock else str(tiny), "files": [str(f) for f in files],
           "tokens": 64, "prompt_tokens": 8, "threads": 2, "n_ctx": 128}
    cfg.update(kw)
    return cfg


def test_worker_runs_stock_and_dymoe(tiny):
    stock = run_worker(_cfg(tiny, name="stock", madv_random=True), None, 120)
    assert stock["ok"], stock
    mode = "per-expert" if _has_patch() else "per-layer"
    dy = run_worker(_cfg(tiny, name="dymoe", kind="dymoe", mode=mode, lookahead=1, skip=0.05, budget=2 * MiB),
                    None, 120)
    assert dy["ok"], dy
    for r in (stock, dy):
        for f in SPEED_FIELDS:
            assert f in r, f
        assert r["tokens"] == 64 and len(r["step_s"]) == 64
        assert r["ttft_s"] >= r["load_s"] > 0 and r["tpot_s"] > 0
        assert r["peak_rss"] > 0 and r["killed"] is False
        assert r["resident_at_start"] == 0  # cold page cache
    assert stock["controller"] is None and stock["callback_share"] is None
    c = dy["controller"]
    assert c["mode"] == mode and c["budget_bytes"] == 2 * MiB and c["callback_error"] is None
    # the callback's share of decode time: its seconds during the 64 steps over their sum
    assert 0 < dy["callback_share"] < 1
    assert dy["callback_s_per_token"] == pytest.approx(dy["callback_share"] * sum(dy["step_s"]) / 64, rel=0.01)
    # ... and per MoE layer per token (issue 13's hot-path target is stated in that unit), without the
    # demand reads the Python callback's seconds include (skip keeps this run on the Python path)
    n_moe = len(BundleIndex(tiny).moe_layers)
    assert c["hot_path"] == "python" and 0 <= dy["miss_s_per_token"] <= dy["callback_s_per_token"]
    own = dy["callback_s_per_token"] - dy["miss_s_per_token"]
    assert dy["callback_s_per_layer_token"] == pytest.approx(own / n_moe, rel=1e-6, abs=1e-9)
    assert stock["callback_s_per_layer_token"] is None


def test_worker_passes_runtime_options(tiny):
    """``options`` reach Controller.open: a sweep point's knob really takes effect (and a bad one fails)."""
    mode = "per-expert" if _has_patch() else "per-layer"
    r = run_worker(_cfg(tiny, name="nola", kind="dymoe", mode=mode, budget=2 * MiB,
                        options={"lookahead": 0, "lookahead_min_recall": 0.0}), None, 120)
    assert r["ok"], r
    assert r["controller"]["lookahead_recall"] is None  # no look-ahead: nothing predicted
    bad = run_worker(_cfg(tiny, name="bad", kind="dymoe", options={"no_such_knob": 1}), None, 120)
    assert bad["ok"] is False and "no_such_knob" in bad["error"]


def test_cgroup_create_and_remove():
    why = cgroup.why_unavailable()
    if why:
        pytest.skip(f"no memory cgroup here: {why}")
    cap = cgroup.MemoryCap.create(64 * MiB)
    try:
        assert cap.path.is_dir()
        assert abs(cap.read_limit() - 64 * MiB) <= 1 << 16
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"], preexec_fn=cap.join_self)
        time.sleep(0.1)
        assert proc.pid in cap.pids()
        proc.wait()
        assert cap.peak() and cap.peak() > 0
        assert cap.oom_kills() == 0
    finally:
        cap.close()
    assert not cap.path.exists()
    cap.close()  # again: harmless


def test_worker_over_the_cap_is_recorded_as_killed(tiny):
    why = cgroup.why_unavailable()
    if why:
        pytest.skip(f"no memory cgroup here: {why}")
    r = run_worker(_cfg(tiny, name="hog", allocate=400 * MiB), 96 * MiB, 60)
    assert r["killed"] is True and r["ok"] is False
    assert r["oom_kills"] >= 1 and r["signal"] == "SIGKILL"
    assert r["cgroup_peak"] <= 96 * MiB + (1 << 16)


def test_worker_killed_by_a_signal_is_a_result(tiny):
    r = run_worker(_cfg(tiny, name="dies", self_kill=True), None, 60)
    assert r["killed"] is True and r["signal"] == "SIGKILL" and r["ok"] is False and r["crashed"] is False
    assert r["name"] == "dies" and r["error"] == "killed by SIGKILL"


SEGFAULT = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]  # a real crash (the JSON config follows)


def test_worker_crash_is_a_result_not_a_failure(tiny):
    """A configuration that segfaults (llama.cpp's AMX path does, on Sapphire Rapids) is reported as
    'crashed: SIGSEGV', as one killed for memory is reported as killed; the runner itself goes on."""
    r = run_worker(_cfg(tiny, name="stock-q4k-default"), None, 60, entry=SEGFAULT)
    assert r["ok"] is False and r["crashed"] is True and r["killed"] is False and r["timed_out"] is False
    assert r["signal"] == "SIGSEGV" and r["error"] == "crashed: SIGSEGV" and r["name"] == "stock-q4k-default"
    why = cgroup.why_unavailable()
    if why is None:  # under a cap as the bench runs it: still a crash, not an OOM kill
        r = run_worker(_cfg(tiny, name="capped"), 256 * MiB, 60, entry=SEGFAULT)
        assert r["crashed"] is True and r["oom_kills"] == 0 and r["error"] == "crashed: SIGSEGV"
    res = _recorded()
    res["runs"].insert(0, {**r, "cap_share": 0.5, "capped": True, "desc": "x", "budget": None})
    add_ratios(res["runs"])
    md = report.render_markdown(res)
    assert "**crashed: SIGSEGV**" in md and "27.3×" in md  # the other configurations' ratios are unaffected


def test_worker_error_is_a_result(tiny):
    r = run_worker(_cfg(tiny, name="bad", model=str(tiny / "missing.gguf"), files=[]), None, 60)
    assert r["ok"] is False and r["killed"] is False and r["error"]


# ---------------------------------------------------------------------------- report from a recorded result
def _run(name: str, tpot: float, ttft: float, bpt: float, ok: bool = True, kind: str = "stock", **kw) -> dict:
    r = {"name": name, "kind": kind, "ok": ok, "cap_share": 0.5, "cap_bytes": 455 * MiB, "capped": True,
         "desc": name, "budget": None, "cgroup_peak": 450 * MiB, "killed": False, "timed_out": False}
    if ok:
        r.update({"tpot_s": tpot, "ttft_s": ttft, "bytes_per_token": bpt, "major_faults_per_token": bpt / 4096,
                  "peak_rss": 300 * MiB, "resident_model_bytes": 200 * MiB, "controller": None})
    r.update(kw)
    return r


RECORDED = {
    "version": 1, "capped": True, "cap_reason": None, "cap_bytes": 455 * MiB, "cap_shares": [0.5], "quick": True,
    "model": {"n_layer": 4}, "model_desc": "synthetic OLMoE-shape: 4 layers", "q4k_model_bytes": 910 * MiB,
    "q4k_expert_bytes": 880 * MiB, "non_expert_bytes": 30 * MiB, "runtime_allowance": 128 * MiB,
    "tokens": 64, "prompt_tokens": 32, "threads": 2, "patched_build": True,
    "machine": {"cpu": "test cpu", "cores": 2, "ram_bytes": 24 << 30, "kernel": "6.x", "system": "Linux",
                "page_size": 4096, "read_ahead_kb": {"vda": 8192}, "model_device": {"device": "vda",
                                                                                   "read_ahead_kb": 8192},
                "llama_cpp_python": "0.3.36", "python": "3.11"},
    "configs": ["stock-q4k-default", "stock-q4k", "stock-q4k-tuned", "dymoe-expert", "stock-q4k-warm"],
    "runs": [
        _run("stock-q4k-default", 0, 0, 0, ok=False, killed=True, signal="SIGKILL", error="killed by OOM"),
        _run("stock-q4k", 0.546, 9.0, 605 * MiB, major_faults_per_token=100),  # read-ahead: few big faults
        _run("stock-q4k-tuned", 0.130, 6.0, 17 * MiB),
        _run("dymoe-expert", 0.020, 2.0, 3 * MiB, kind="dymoe", budget=300 * MiB, callback_share=0.04,
             controller={"mode": "per-expert", "hit_rate": 0.9, "lookahead_recall": 0.93, "skipped_slots": 0}),
        _run("stock-q4k-warm", 0.0083, 1.0, 0, capped=False),
    ],
    "quality": {"model": "models/tiny-moe", "ctx": 256, "chunks": 16, "reference": "F16", "rel_budget": 0.34,
                "rows": [{"name": "uniform Q2_K", "ok": True, "ppl": 20.0, "kl": 0.1, "top1": 0.9},
                         {"name": "uniform Q4_K", "ok": True, "ppl": 18.0, "kl": 0.02, "top1": 0.97},
                         {"name": "dymoe per-expert @ 34% of Q4_K experts", "ok": True, "ppl": 18.5, "kl": 0.04,
                          "top1": 0.96}]},
    "notes": [], "read_bandwidth": {"bps": 1e9, "bytes": 256 * MiB},
}


def _recorded(capped: bool = True) -> dict:
    res = copy.deepcopy(RECORDED)
    res["capped"] = capped
    if not capped:
        res["cap_reason"] = "not root"
    add_ratios(res["runs"])
    add_bounds(res["runs"], res["read_bandwidth"]["bps"])
    res["headline"] = headline(res["runs"], 0.5, capped)
    res["projection"] = report.projection(res)
    return res


def test_report_renders_markdown_json_and_plots(tmp_path):
    res = _recorded()
    h = res["headline"]
    assert h["tpot_ratio"] == pytest.approx(0.546 / 0.020)
    assert h["ttft_ratio"] == pytest.approx(9.0 / 2.0)
    assert h["tpot_ratio_tuned"] == pytest.approx(0.130 / 0.020)
    assert h["capped"] is True and h["dymoe_config"] == "dymoe-expert"
    # physical bound: warm compute 8.3 ms + 3 MiB / (1 GB/s)
    assert h["bound_ratio"] == pytest.approx(0.020 / (0.0083 + 3 * MiB / 1e9))
    assert h["bound_ratios"]["stock-q4k"] == pytest.approx(0.546 / (0.0083 + 605 * MiB / 1e9))
    assert h["callback_share"] == 0.04 and "stock-q4k-warm" not in h["bound_ratios"]
    files = report.write_all(res, tmp_path)
    md = files["markdown"].read_text()
    assert md.splitlines()[0].startswith("Capped:")
    assert "**killed** (SIGKILL)" in md and "PROJECTION" in md and "read_ahead_kb" in md
    assert "27.3×" in md  # 0.546 / 0.020
    assert "| TPOT ÷ physical bound |" in md and "÷ 1000 MB/s" in md and "| 4.0% |" in md
    back = json.loads(files["json"].read_text())
    assert back["headline"]["tpot_ratio"] == pytest.approx(h["tpot_ratio"])
    assert back["projection"]["label"].startswith("PROJECTION")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tpot_vs_budget.png").stat().st_size > 1000
    assert (tmp_path / "bytes_per_token.png").stat().st_size > 1000


def test_report_says_uncapped_in_its_first_line():
    res = _recorded(capped=False)
    md = report.render_markdown(res)
    assert md.splitlines()[0].startswith("**UNCAPPED**") and "not root" in md.splitlines()[0]
    assert "(uncapped)" in md
    assert res["headline"]["capped"] is False and "note" in res["headline"]


def test_projection_is_labelled_and_uses_measured_bytes():
    p = _recorded()["projection"]
    assert p["label"] == "PROJECTION (computed, not measured)" and p["compute_s"] == pytest.approx(0.0083)
    rows = {r["name"]: r for r in p["rows"]}
    sd = "Raspberry Pi 5, SD card (~90 MB/s)"
    assert rows["stock-q4k"]["tpot_s"][sd] == pytest.approx(0.0083 + 605 * MiB / 90e6)  # bandwidth-bound
    faults = 17 * MiB / 4096  # tuned: one 4 KiB read per fault -> latency-bound on an SD card
    assert rows["stock-q4k-tuned"]["tpot_s"][sd] == pytest.approx(0.0083 + faults * 0.5e-3)
    assert rows["dymoe-expert"]["speedup"][sd] > 1


def test_run_bench_end_to_end_tiny(tmp_path):
    names = ["stock-q4k", "stock-q4k-tuned", "dymoe-expert" if _has_patch() else "dymoe-layer", "stock-q4k-warm"]
    res = run_bench(BenchOptions(out=tmp_path / "out", model=BenchModel(vocab=512, **TINY), cap="256MB",
                                 tokens=64, prompt_tokens=8, configs=names, quality=False,
                                 cache_root=tmp_path / "cache"), log=lambda s: None)
    h = res["headline"]
    for k in ("tpot_ratio", "ttft_ratio", "tpot_ratio_tuned", "capped", "bound_ratio", "callback_share",
              "callback_s_per_layer_token", "hot_path"):
        assert k in h and h[k] is not None, k
    assert h["capped"] == (cgroup.why_unavailable() is None)
    assert all(r["ok"] for r in res["runs"]), [r.get("error") for r in res["runs"]]
    bw = res["read_bandwidth"]
    assert bw["ok"] and bw["bps"] > 1e6  # a real cold read (where /proc/self/io says where the bytes came from)
    assert bw["storage_bytes"] is None or bw["storage_bytes"] >= bw["bytes"] // 2
    assert h["bound_ratio"] > 0 and 0 < h["callback_share"] < 1
    assert res["routings"] == ["realistic"] and list(res["by_model"]) == ["realistic"]
    rs = res["routing"]["realistic"]  # calibrate + the controller's look-ahead recall on the model itself
    assert len(rs["normalized_entropy"]) == TINY["n_layer"] and 0 <= rs["lookahead_recall"] <= 1
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "result.json").is_file()
    assert not (tmp_path / "cache" / BenchModel(vocab=512, **TINY).key() / "hf").exists()  # checkpoint cleaned up
