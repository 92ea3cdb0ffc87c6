"""``dymoe-gguf bench``: every configuration in its own capped subprocess, one run, ratios against its baseline.

    models (realistic routing; + random) -> read bandwidth in the cgroups -> for each model, cap,
    configuration: cgroup(cap, throttle) + worker subprocess -> one JSON result (or killed / crashed)
    -> ratios and physical bounds (compare.py) -> routing statistics -> quality on the trained model
    -> optional sweeps (sweeps.py) -> report.py: result.json, report.md, PNG plots, projection

The baseline of every ratio is stock llama.cpp (the same build, patch features off), uniform Q4_K,
repack off, plain mmap, at the same cap, on the same model, in the same run. dymoe's expert budget is
the cap minus an allowance for what is not expert weights (see :func:`expert_budget`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dymoe_gguf.bench import cgroup, throttle
from dymoe_gguf.bench.compare import HEADLINE, add_bounds, add_ratios, headline
from dymoe_gguf.bench.configs import (
    CONFIGS,
    FULL_CONFIGS,
    QUICK_CONFIGS,
    ROUTINGS,
    RUNTIME_ALLOWANCE,
    SECOND_MODEL_CONFIGS,
    BenchOptions,
    worker_cfg,
)
from dymoe_gguf.bench.machine import machine_info, patch_available
from dymoe_gguf.bench.models import UNIFORM, BenchModel, ensure_bundles, ensure_trained_bundle, find_trained
from dymoe_gguf.bench.runner import measure_read_bandwidth, prepare_throttle, run_worker
from dymoe_gguf.errors import DymoeError

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
HELDOUT, CALIBRATION = ROOT / "data" / "heldout.txt", ROOT / "data" / "calibration.txt"


# ---------------------------------------------------------------------------- sizes
def parse_cap(spec: str, q4k_bytes: int) -> int:
    """'50%' or '0.5' -> share of the Q4_K model; '455MB' -> bytes."""
    from dymoe_gguf.util import parse_size

    s = str(spec).strip()
    if s.endswith("%"):
        return int(q4k_bytes * float(s[:-1]) / 100)
    try:
        v = float(s)
    except ValueError:
        return parse_size(s)
    if 0 < v <= 4:
        return int(q4k_bytes * v)
    return int(v)


def non_expert_bytes(bundle: Path) -> int:
    """Bytes of the base model that are not expert weights (embeddings, attention, norms, output)."""
    from dymoe_gguf.bundle import BundleIndex
    from dymoe_gguf.bundle.format import is_expert_tensor

    idx = BundleIndex(bundle)
    return sum(t.nbytes for n, t in idx.base_tensors.items() if not is_expert_tensor(n))


def expert_budget(cap: int, bundle: Path, allowance: int = RUNTIME_ALLOWANCE) -> int:
    """dymoe's resident-expert budget under a cap: cap - non-expert weights - runtime allowance."""
    return max(16 * MiB, cap - non_expert_bytes(bundle) - allowance)


def q4k_expert_bytes(bundle: Path) -> int:
    """Bytes of all experts at Q4_K (the unit of relative budgets)."""
    from dymoe_gguf.bundle import BundleIndex
    from dymoe_gguf.bundle.format import Tier

    idx = BundleIndex(bundle)
    return int(idx.expert_bytes()[:, :, idx.tiers.index(Tier.Q4_K)].sum())


def read_limits(opts: BenchOptions) -> tuple[int | None, int | None]:
    """(bytes/s, IOPS) to throttle reads to: ``--storage``'s profile, overridden by ``--read-bps/--read-iops``."""
    prof = None
    if opts.storage is not None:
        prof = throttle.STORAGE.get(opts.storage)
        if prof is None:
            raise DymoeError(f"Unknown storage profile {opts.storage!r}: expected {', '.join(throttle.STORAGE)}")
    bps = throttle.parse_rate(opts.read_bps) if opts.read_bps is not None else (prof.bps if prof else None)
    iops = throttle.parse_iops(opts.read_iops) if opts.read_iops is not None else (prof.iops if prof else None)
    return bps, iops


# ---------------------------------------------------------------------------- quality and routing
def run_quality(opts: BenchOptions, rel_budget: float | None, threads: int, mode: str,
                log: Callable[[str], None], skip: bool = False) -> dict:
    """ppl / KL / top-1 on the trained model: uniform Q2_K, Q4_K, Q8_0 and dymoe at ``rel_budget`` x Q4_K experts."""
    from dymoe_gguf.bench.configs import SKIP_THRESHOLD

    src = find_trained()
    if src is None or not HELDOUT.is_file():
        return {"skipped": "the trained model (models/tiny-moe) or data/heldout.txt is not present"}
    bundle = ensure_trained_bundle(src, root=opts.cache_root, threads=threads, log=log, progress=opts.progress)
    chunks = opts.quality_chunks or (16 if opts.quick else None)
    base = {"kind": "quality", "model": str(bundle), "text": str(HELDOUT), "ctx": 256, "chunks": chunks,
            "threads": threads}
    rows = [dict(base, name=f"uniform {t}", policy=f"uniform:{t}") for t in ("Q2_K", "Q4_K", "Q8_0")]
    budget = None
    if rel_budget is not None:
        budget = int(rel_budget * q4k_expert_bytes(bundle))
        at = f"@ {100 * rel_budget:.0f}% of Q4_K experts"
        rows.append(dict(base, name=f"dymoe {mode} {at}", policy="dymoe", mode=mode, lookahead=1, budget=budget))
        if skip:
            rows.append(dict(base, name=f"dymoe {mode} + skip < {SKIP_THRESHOLD} {at}", policy="dymoe", mode=mode,
                             lookahead=1, budget=budget, skip=SKIP_THRESHOLD))
    out = []
    for cfg in rows:
        log(f"quality: {cfg['name']}")
        out.append(run_worker(cfg, None, opts.timeout))
    return {"model": str(src), "bundle": str(bundle), "text": str(HELDOUT), "ctx": 256, "chunks": chunks,
            "reference": "the same model at F16 (the bundle's base)", "rel_budget": rel_budget,
            "budget_bytes": budget, "rows": out}


def routing_of(bundle: Path, dest: Path, threads: int, timeout: float) -> dict:
    """Routing statistics (:mod:`dymoe_gguf.bench.routing`) of ``bundle`` in a worker; calibrated copy at ``dest``."""
    r = run_worker({"kind": "routing", "name": "routing", "model": str(bundle), "text": str(CALIBRATION),
                    "calibrated": str(dest), "chunks": 8, "threads": threads}, None, timeout)
    return r if r.get("ok") else {"error": r.get("error"), "ok": False}


def _sweeps(opts: BenchOptions, speed: Path, threads: int, patched: bool, log: Callable[[str], None],
            timeout: float) -> dict:
    from dymoe_gguf.bench.routing import calibrated_copy
    from dymoe_gguf.bench.sweeps import run_sweeps

    src = find_trained()
    if src is None or not HELDOUT.is_file():
        return {"skipped": "the trained model (models/tiny-moe) or data/heldout.txt is not present"}
    trained = ensure_trained_bundle(src, root=opts.cache_root, threads=threads, log=log, progress=opts.progress)
    log("calibrating copies of the trained and the synthetic model for the static policy")
    t_cal, _ = calibrated_copy(trained, CALIBRATION, trained.parent / "calibrated.dymoe", threads=threads)
    s_cal, _ = calibrated_copy(speed, CALIBRATION, speed.parent / "q4k-calibrated.dymoe", threads=threads)
    base = {"tokens": opts.tokens, "prompt_tokens": opts.prompt_tokens, "threads": threads, "seed": 0,
            "n_ctx": max(128, opts.prompt_tokens + opts.tokens + 16)}
    return run_sweeps(trained=t_cal, text=HELDOUT, speed_bundle=s_cal, q4k_trained=q4k_expert_bytes(t_cal),
                      q4k_speed=q4k_expert_bytes(s_cal), fixed_bytes=non_expert_bytes(s_cal) + opts.allowance,
                      worker=lambda cfg, cap: run_worker(cfg, cap, timeout), base_cfg=base, patched=patched,
                      chunks=opts.quality_chunks or (16 if opts.quick else 40), threads=threads, log=log)


# ---------------------------------------------------------------------------- the run
def _plan(opts: BenchOptions, has_patch: bool, notes: list[str]) -> tuple[list[str], tuple[str, ...]]:
    names = list(opts.configs or (QUICK_CONFIGS if opts.quick else FULL_CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise DymoeError(f"Unknown bench configuration(s) {', '.join(unknown)}: expected some of {', '.join(CONFIGS)}")
    routings = opts.routing or ((opts.model.routing,) if opts.model else ("realistic",) if opts.quick else ROUTINGS)
    bad = [r for r in routings if r not in ROUTINGS]
    if bad:
        raise DymoeError(f"Unknown routing {', '.join(bad)}: expected {', '.join(ROUTINGS)}")
    if not has_patch:
        dropped = [n for n in names if CONFIGS[n].get("mode") == "per-expert"]
        names = [n for n in names if n not in dropped]
        if dropped and "dymoe-layer" not in names:
            names.append("dymoe-layer")
        notes.append("this llama.cpp build is stock (no per-expert patch): per-expert configurations were "
                     f"skipped ({', '.join(dropped) or 'none'})")
    return names, tuple(routings)


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the benchmark; writes result.json, report.md and plots into ``opts.out``; returns the result."""
    from dymoe_gguf.bench import report

    t_start = time.perf_counter()
    threads = opts.threads or os.cpu_count() or 1
    bps, iops = read_limits(opts)
    has_patch = patch_available()
    notes: list[str] = []
    names, routings = _plan(opts, has_patch, notes)
    shape = opts.model or BenchModel(n_layer=opts.layers or (2 if opts.quick else 4))
    models = {r: replace(shape, routing=r) for r in routings}
    primary = routings[0]
    per_model = {r: names if r == primary or opts.configs else [n for n in names if n in SECOND_MODEL_CONFIGS]
                 for r in routings}
    bundles = {}
    for r, m in models.items():
        keys = sorted({UNIFORM[CONFIGS[n]["tier"]] for n in per_model[r] if CONFIGS[n]["kind"] == "stock"} | {"q4k"})
        bundles[r] = ensure_bundles(m, keys, root=opts.cache_root, threads=threads, log=log, progress=opts.progress)
    q4k = bundles[primary]["q4k"]
    q4k_size = (q4k / "model.gguf").stat().st_size
    cap_main = parse_cap(opts.cap, q4k_size)
    shares = [cap_main / q4k_size] + [s for s in (opts.sweep or ()) if abs(s * q4k_size - cap_main) > MiB]
    reason = cgroup.why_unavailable()
    capped = reason is None
    if capped:  # the machine may still refuse: try once
        try:
            cgroup.MemoryCap.create(64 * MiB).close()
        except cgroup.CapUnavailable as exc:
            capped, reason = False, str(exc)
    thr_info = None
    if bps or iops:
        thr_info = prepare_throttle(sorted({f for b in bundles.values() for p in b.values() for f in p.glob("*.gguf")}),
                                    bps=bps, iops=iops)
        log(("S" + thr_info["line"][1:]) if thr_info["throttled"] else
            f"UNTHROTTLED: storage reads could not be throttled to {throttle.fmt_limits(bps, iops)}: "
            f"{thr_info['reason']}")
    on = bool(thr_info and thr_info["throttled"])
    limits = {"read_bps": bps if on else None, "read_iops": iops if on else None,
              "read_devices": [throttle.BlockDevice(*map(int, d["dev"].split(":")), d["device"])
                               for d in thr_info["devices"]] if on and thr_info else None}
    # at most half the cap: the page cache of the read fits, so the figure is storage, not reclaim
    bw = measure_read_bandwidth(q4k / "model.gguf", min(q4k_size, 256 * MiB, cap_main // 2),
                                cap_main if capped else None, **limits)
    log("read bandwidth (cold sequential read in the cgroups): "
        + (throttle.fmt_rate(bw["bps"]) if bw.get("bps") else f"not measured ({bw.get('note')})"))
    runs = []
    for r in routings:
        for share in shares if r == primary else shares[:1]:
            cap_bytes = int(share * q4k_size)
            budget = expert_budget(cap_bytes, bundles[r]["q4k"], opts.allowance)
            for name in per_model[r]:
                spec = CONFIGS[name]
                if spec.get("warm") and share != shares[0]:
                    continue  # compute time: once is enough
                cfg = worker_cfg(name, spec, bundles[r], budget, opts, threads)
                use_cap = cap_bytes if capped and not spec.get("warm") else None
                log(f"{r} model, cap {cap_bytes / MiB:.0f} MiB: {name} ...")
                res = run_worker(cfg, use_cap, opts.timeout, **limits)
                if res.get("throttle_error"):
                    log(f"    UNTHROTTLED: {res['throttle_error']}")
                res.update({"model": r, "cap_share": share, "desc": spec["desc"], "capped": use_cap is not None,
                            "budget": budget if spec["kind"] == "dymoe" else None})
                log(f"    TTFT {res['ttft_s']:.2f} s, TPOT {1000 * res['tpot_s']:.1f} ms, "
                    f"{res['bytes_per_token'] / MiB:.1f} MiB read/token, peak RSS {res['peak_rss'] / MiB:.0f} MiB"
                    if res.get("ok") else f"    {res.get('error')}")
                runs.append(res)
    add_ratios(runs)
    add_bounds(runs, bw.get("bps"))
    th = thr_info["throttled"] if thr_info else None
    by_model = {r: headline(runs, shares[0], capped, bps, th, model=r, read_iops=iops) for r in routings}
    head = by_model[primary]
    routing = {}
    for r in routings:
        log(f"routing statistics of the {r} model")
        routing[r] = routing_of(bundles[r]["q4k"], bundles[r]["q4k"].parent / "q4k-calibrated.dymoe", threads,
                                opts.timeout)
    quality: dict[str, Any] = {"skipped": "not asked for (--no-quality)"}
    if opts.quality:
        dy = next((x for x in runs if x["name"] == head["dymoe_config"] and x["cap_share"] == shares[0]
                   and x["model"] == primary), None)
        rel = dy["budget"] / q4k_expert_bytes(q4k) if dy else None
        quality = run_quality(opts, rel, threads, "per-expert" if has_patch else "per-layer", log,
                              skip=head.get("dymoe_skip_config") is not None)
    sweeps = _sweeps(opts, q4k, threads, has_patch, log, opts.timeout) if opts.sweeps else None
    result = {
        "version": 2, "capped": capped, "cap_reason": reason, "cap_bytes": cap_main, "cap_shares": shares,
        "read_bps": bps, "read_iops": iops, "storage": opts.storage, "throttle": thr_info, "read_bandwidth": bw,
        "quick": opts.quick, "routings": list(routings), "model": asdict(models[primary]),
        "model_desc": models[primary].describe(), "models": {r: m.describe() for r, m in models.items()},
        "model_sizes": {f"{r}/{k}": {f.name: f.stat().st_size for f in sorted(p.glob("*.gguf"))}
                        for r, b in bundles.items() for k, p in b.items()},
        "q4k_model_bytes": q4k_size, "q4k_expert_bytes": q4k_expert_bytes(q4k),
        "non_expert_bytes": non_expert_bytes(q4k), "runtime_allowance": opts.allowance,
        "tokens": opts.tokens, "prompt_tokens": opts.prompt_tokens, "threads": threads,
        "patched_build": has_patch, "machine": machine_info(q4k / "model.gguf"),
        "configs": names, "runs": runs, "headline": head, "by_model": by_model, "routing": routing,
        "quality": quality, "sweeps": sweeps, "notes": notes, "headline_configs": list(HEADLINE),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.perf_counter() - t_start))),
    }
    result["projection"] = report.projection(result)
    result["seconds"] = time.perf_counter() - t_start
    report.write_all(result, opts.out)
    return result
