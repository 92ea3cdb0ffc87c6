"""Ratios of a bench run: every configuration against its baseline, the physical bound, the headline.

Runs are compared only within one (synthetic model, cap) group and only throttled with throttled
(a run whose own throttle failed is not compared with throttled ones). The baseline of every ratio is
stock llama.cpp, uniform Q4_K, repack off, at the same cap, in the same run.

The physical bound of a configuration is ``compute floor + bytes read per token / read bandwidth``:
the compute floor is the warm, uncapped stock Q4_K TPOT of the same model (nothing read), the
bandwidth is a cold sequential read measured in the same run inside the same cgroups (cap and
throttle). ``bound_ratio = TPOT / bound`` (1.0 = the configuration reads what it reads at full
bandwidth and computes like warm stock; the issue's target is ≤ 1.5).

The projection to other devices is arithmetic, not a measurement: for each configuration at the
headline cap, ``projected TPOT = compute + I/O`` where compute is the warm, uncapped stock TPOT measured
in the same run on this machine (not scaled to the device's CPU) and I/O is the larger of ``bytes read
per token / sequential bandwidth`` and ``major faults per token x 4 KiB random-read latency`` (a fault
is a synchronous small read; prefetched bulk reads are bandwidth-bound).
"""

from __future__ import annotations

from typing import Any

from dymoe_gguf.bench.timing import ratio

BASELINE = "stock-q4k"
TUNED = "stock-q4k-tuned"
WARM = "stock-q4k-warm"
HEADLINE = ("dymoe-expert", "dymoe-layer")  # the first of these that ran is "dymoe" in the headline

# name -> (sequential read bytes/s, latency of one synchronous 4 KiB random read, s). Assumptions, stated.
DEVICES: dict[str, tuple[float, float]] = {
    "Raspberry Pi 5, SD card (~90 MB/s)": (90e6, 0.5e-3),
    "Raspberry Pi 5, NVMe (~800 MB/s)": (800e6, 0.1e-3),
    "Jetson Orin, NVMe (~2 GB/s)": (2e9, 0.1e-3),
    "Mac mini SSD (~3 GB/s)": (3e9, 0.06e-3),
}


def _group(r: dict) -> tuple[Any, Any]:
    return r.get("model"), r["cap_share"]


def add_ratios(runs: list[dict]) -> None:
    """Every run gets its ratios against the baseline (stock Q4_K repack off) of its model and cap."""
    base = {_group(r): r for r in runs if r["name"] == BASELINE and r.get("ok")}
    for r in runs:
        b = base.get(_group(r))
        if (not r.get("ok") or b is None or not r.get("capped", True) and b.get("capped")
                or bool(r.get("throttled")) != bool(b.get("throttled"))):
            r["tpot_speedup"] = r["ttft_speedup"] = r["bytes_ratio"] = None
            continue
        r["tpot_speedup"] = ratio(b["tpot_s"], r["tpot_s"])
        r["ttft_speedup"] = ratio(b["ttft_s"], r["ttft_s"])
        r["bytes_ratio"] = ratio(r["bytes_per_token"], b["bytes_per_token"])


def add_bounds(runs: list[dict], read_bps: float | None) -> None:
    """Every run gets ``bound_s`` (compute floor + bytes/token ÷ ``read_bps``) and ``bound_ratio``.

    The compute floor is the warm stock run of the same model; None where it or the bandwidth is missing.
    """
    warm = {r.get("model"): r["tpot_s"] for r in runs if r["name"] == WARM and r.get("ok")}
    for r in runs:
        floor = warm.get(r.get("model"))
        if not r.get("ok") or r["name"] == WARM or floor is None or not read_bps:
            r["bound_s"] = r["bound_ratio"] = None
            continue
        r["bound_s"] = floor + r["bytes_per_token"] / read_bps
        r["bound_ratio"] = r["tpot_s"] / r["bound_s"]


def _vs(b: dict | None, t: dict | None, dy: dict | None, suffix: str = "") -> dict:
    """Ratios of one dymoe run against the baseline ``b`` and tuned stock ``t``."""
    def get(r, k):
        return r.get(k) if r else None

    return {
        f"tpot_ratio{suffix}": ratio(get(b, "tpot_s"), get(dy, "tpot_s")),
        f"ttft_ratio{suffix}": ratio(get(b, "ttft_s"), get(dy, "ttft_s")),
        f"tpot_ratio_tuned{suffix}": ratio(get(t, "tpot_s"), get(dy, "tpot_s")),
        f"ttft_ratio_tuned{suffix}": ratio(get(t, "ttft_s"), get(dy, "ttft_s")),
        f"bytes_per_token_ratio{suffix}": ratio(get(dy, "bytes_per_token"), get(b, "bytes_per_token")),
        f"bound_ratio{suffix}": get(dy, "bound_ratio"), f"callback_share{suffix}": get(dy, "callback_share"),
        f"callback_s_per_layer_token{suffix}": get(dy, "callback_s_per_layer_token"),
        f"dymoe_tpot_s{suffix}": get(dy, "tpot_s"), f"dymoe_ttft_s{suffix}": get(dy, "ttft_s"),
        f"dymoe_bytes_per_token{suffix}": get(dy, "bytes_per_token"),
    }


def headline(runs: list[dict], cap_share: float, capped: bool, read_bps: int | None = None,
             throttled: bool | None = None, model: str | None = None, read_iops: int | None = None) -> dict:
    """tpot_ratio / ttft_ratio (baseline / dymoe), tpot_ratio_tuned (tuned / dymoe), bound_ratio,
    callback_share, bytes ratio, capped — for one synthetic model at one cap.

    ``read_bps`` / ``read_iops``: the storage read throttle asked for (None: not asked); ``throttled``
    whether it was set. "dymoe" is the runtime's defaults (per-expert with the patch, look-ahead 1, no
    skip); the same ratios for its skip variant carry the suffix ``_skip`` (skip changes the output).
    """
    at = {r["name"]: r for r in runs if r["cap_share"] == cap_share and r.get("model") == model}
    asked = bool(read_bps or read_iops)
    want = bool(asked and throttled)

    def ok(r):
        return r if r is not None and r.get("ok") and bool(r.get("throttled")) == want else None

    dy = next((at[n] for n in HEADLINE if ok(at.get(n))), None)
    sk = ok(at.get(dy["name"] + "-skip")) if dy else None
    b, t = ok(at.get(BASELINE)), ok(at.get(TUNED))
    c = (dy or {}).get("controller") or {}
    h = {"capped": capped, "read_bps": read_bps, "read_iops": read_iops, "throttled": throttled if asked else None,
         "model": model, "cap_share": cap_share,
         "cap_bytes": next((r.get("cap_bytes") for r in at.values() if r.get("cap_bytes")), None),
         "dymoe_config": dy["name"] if dy else None, "dymoe_skip_config": sk["name"] if sk else None}
    h |= _vs(b, t, dy)
    h |= {"baseline_tpot_s": b["tpot_s"] if b else None, "tuned_tpot_s": t["tpot_s"] if t else None,
          "baseline_ttft_s": b["ttft_s"] if b else None, "tuned_ttft_s": t["ttft_s"] if t else None,
          "baseline_bytes_per_token": b["bytes_per_token"] if b else None,
          "tuned_bytes_per_token": t["bytes_per_token"] if t else None,
          "bound_ratios": {n: r.get("bound_ratio") for n, r in at.items() if r.get("ok") and r.get("bound_ratio")},
          "lookahead_recall": c.get("lookahead_recall"), "hit_rate": c.get("hit_rate"),
          "lookahead_precision": c.get("lookahead_precision"), "prefetch_on": c.get("prefetch_on"),
          "hot_path": c.get("hot_path")}
    if sk:
        h |= _vs(b, t, sk, "_skip")
    if not capped:
        h["note"] = "uncapped: no memory cap could be set, these ratios are not under memory pressure"
    if asked and not throttled:
        h["throttle_note"] = ("unthrottled: storage reads could not be throttled, these runs read at this "
                              "machine's own storage speed")
    return h


# ---------------------------------------------------------------------------- projection
def projection(result: dict) -> dict[str, Any]:
    """Projected TPOT per device for each configuration that ran at the headline cap."""
    share = result["cap_shares"][0]
    primary = (result.get("routings") or [None])[0]
    warm = next((r for r in result["runs"] if r["name"] == WARM and r.get("ok") and r.get("model") == primary), None)
    compute = warm["tpot_s"] if warm else None
    rows = []
    for r in (r for r in result["runs"] if r["cap_share"] == share and r.get("model") == primary):
        if not r.get("ok") or r["name"] == WARM or compute is None:
            continue
        per = {}
        for dev, (bw, lat) in DEVICES.items():
            io = max(r["bytes_per_token"] / bw, r["major_faults_per_token"] * lat)
            per[dev] = compute + io
        rows.append({"name": r["name"], "bytes_per_token": r["bytes_per_token"],
                     "major_faults_per_token": r["major_faults_per_token"], "tpot_s": per})
    base = next((x for x in rows if x["name"] == BASELINE), None)
    for x in rows:
        x["speedup"] = ({d: base["tpot_s"][d] / x["tpot_s"][d] for d in DEVICES} if base else None)
    return {"label": "PROJECTION (computed, not measured)", "compute_s": compute,
            "devices": {d: {"bandwidth": bw, "latency_4k": lat} for d, (bw, lat) in DEVICES.items()}, "rows": rows}
