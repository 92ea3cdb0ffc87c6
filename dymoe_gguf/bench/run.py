"""``dymoe-gguf bench``: every configuration in its own capped subprocess, one run, ratios against its baseline.

    models  -> for each cap: for each configuration: cgroup(cap) + worker subprocess -> one JSON result
            -> ratios against stock Q4_K repack-off at the same cap -> quality on the trained model
            -> report.py: result.json, report.md, PNG plots, projection table

The baseline of every ratio is stock llama.cpp (the same build, patch features off), uniform Q4_K,
repack off, plain mmap, at the same cap, in the same run. dymoe's expert budget is the cap minus an
allowance for what is not expert weights (see :func:`expert_budget`).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dymoe_gguf.bench import cgroup
from dymoe_gguf.bench.models import UNIFORM, BenchModel, ensure_bundles, ensure_trained_bundle, find_trained
from dymoe_gguf.errors import DymoeError

MiB = 1 << 20
# Memory a process needs besides expert weights, on top of the base model's non-expert tensors:
# Python + numpy + llama-cpp-python, KV cache, compute buffers, logits, the controller's arrays.
# Measured RssAnon on the OLMoE-shape models here: stock worker 28 MiB, dymoe worker 45 MiB; the rest
# is headroom (page tables, kernel memory charged to the cgroup, libraries not yet cached).
RUNTIME_ALLOWANCE = 64 * MiB
SKIP_THRESHOLD = 0.05  # "with skip": drop selected experts whose gate weight is below this
BASELINE = "stock-q4k"
TUNED = "stock-q4k-tuned"
WARM = "stock-q4k-warm"

# name -> worker settings (and a description for the report)
CONFIGS: dict[str, dict[str, Any]] = {}
for _tier, _key in UNIFORM.items():
    _t = _key
    CONFIGS[f"stock-{_t}-default"] = {"kind": "stock", "tier": _tier, "repack": True,
                                      "desc": f"stock {_tier}, llama.cpp defaults (repack on)"}
    CONFIGS[f"stock-{_t}"] = {"kind": "stock", "tier": _tier, "repack": False,
                              "desc": f"stock {_tier}, repack off" + (" (baseline)" if _tier == "Q4_K" else "")}
    CONFIGS[f"stock-{_t}-tuned"] = {"kind": "stock", "tier": _tier, "repack": False, "madv_random": True,
                                    "desc": f"stock {_tier}, repack off + MADV_RANDOM (tuned)"}
for _mode, _m in (("per-layer", "layer"), ("per-expert", "expert")):
    for _la in (1, 0):
        for _skip in (0.0, SKIP_THRESHOLD):
            _name = f"dymoe-{_m}" + ("" if _la else "-nola") + ("-skip" if _skip else "")
            CONFIGS[_name] = {"kind": "dymoe", "mode": _mode, "lookahead": _la, "skip": _skip,
                              "desc": f"dymoe {_mode}" + (", look-ahead 1" if _la else ", no look-ahead")
                              + (f", skip < {_skip}" if _skip else "")}
CONFIGS[WARM] = {"kind": "stock", "tier": "Q4_K", "repack": False, "warm": True,
                 "desc": "stock Q4_K, repack off, uncapped, warm cache (compute time; not a ratio)"}

QUICK_CONFIGS = [BASELINE, TUNED, "dymoe-expert", WARM]
FULL_CONFIGS = list(CONFIGS)
HEADLINE = ("dymoe-expert", "dymoe-layer")  # the first of these that ran is "dymoe" in the headline


@dataclass
class BenchOptions:
    """What ``dymoe-gguf bench`` runs."""

    out: Path = Path("bench-out")
    quick: bool = False
    layers: int | None = None  # default: 2 with --quick, else 4
    cap: str = "50%"  # share of the Q4_K model file ("50%", "0.5") or a size ("455MB")
    sweep: tuple[float, ...] | None = None  # extra caps (shares of the Q4_K model) for the TPOT-vs-budget plot
    tokens: int = 64
    prompt_tokens: int = 32
    configs: list[str] | None = None
    threads: int | None = None
    quality: bool = True
    quality_chunks: int | None = None  # default: 16 with --quick, else all
    model: BenchModel | None = None  # default: OLMoE shape with ``layers`` layers
    timeout: float = 900.0
    allowance: int = RUNTIME_ALLOWANCE
    read_bps: int | str | None = None  # throttle every configuration's storage reads ("90MB": bytes/s); None: off
    cache_root: Path | None = None
    extra: dict = field(default_factory=dict)  # extra worker settings (tests)


# ---------------------------------------------------------------------------- machine facts
def machine_info(model_file: Path | None = None) -> dict[str, Any]:
    """CPU, cores, RAM, kernel, page size and the storage read-ahead (read_ahead_kb)."""
    import mmap

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ra = {}
    for q in sorted(Path("/sys/block").glob("*/queue/read_ahead_kb")):
        dev = q.parent.parent.name
        if not dev.startswith(("loop", "ram", "zram")):
            ra[dev] = int(q.read_text())
    model_dev = None
    if model_file is not None and Path("/sys/dev/block").is_dir():
        st = os.stat(model_file)
        p = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        for cand in (p, p.parent):  # a partition's queue/ lives on its disk
            try:
                if (cand / "queue" / "read_ahead_kb").is_file():
                    model_dev = {"device": cand.resolve().name,
                                 "read_ahead_kb": int((cand / "queue" / "read_ahead_kb").read_text())}
                    break
            except OSError:
                pass
    import llama_cpp

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "kernel": platform.release(), "system": platform.system(), "page_size": mmap.PAGESIZE,
            "read_ahead_kb": ra, "model_device": model_dev, "llama_cpp_python": llama_cpp.__version__,
            "python": platform.python_version()}


def patch_available() -> bool:
    """Whether this build of llama.cpp has the per-expert view patch."""
    from dymoe_gguf._native import patch

    try:
        return patch.load() is not None
    except DymoeError:
        return False


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
    from dymoe_gguf.bundle import BundleIndex
    from dymoe_gguf.bundle.format import Tier

    idx = BundleIndex(bundle)
    return int(idx.expert_bytes()[:, :, idx.tiers.index(Tier.Q4_K)].sum())


# ---------------------------------------------------------------------------- one subprocess
def _files_of(cfg: dict) -> list[Path]:
    """The model files a configuration reads (what a read throttle must cover)."""
    files = [Path(f) for f in cfg.get("files") or ()]
    model = Path(cfg["model"]) if cfg.get("model") else None
    if model is not None and model.is_file():
        files.append(model)
    elif model is not None and model.is_dir():
        files += sorted(model.glob("*.gguf"))
    return files


def run_worker(cfg: dict, cap_bytes: int | None, timeout: float, env: dict | None = None,
               entry: list[str] | None = None, read_bps: int | None = None,
               read_devices: list[cgroup.BlockDevice] | None = None) -> dict:
    """Run one configuration in its own process (in its own memory cgroup when ``cap_bytes``).

    ``read_bps`` throttles the process's storage reads on ``read_devices`` (default: the disks holding
    the configuration's files); where that cannot be set up the run goes on unthrottled and says so
    (``throttled: false``, ``throttle_error``). ``entry`` replaces ``[python, -m, dymoe_gguf.bench.worker]``
    (experiments with a modified worker).
    """
    cap = cgroup.MemoryCap.create(cap_bytes) if cap_bytes else None
    thr: cgroup.ReadThrottle | None = None
    thr_error: str | None = None
    cmd = (entry or [sys.executable, "-m", "dymoe_gguf.bench.worker"]) + [json.dumps(cfg)]
    run_env = dict(os.environ if env is None else env)
    run_env.pop("DYMOE_NO_POPULATE", None)  # only the controller turns it on, for itself
    t0 = time.perf_counter()
    timed_out = False
    try:
        if read_bps:
            try:
                devices = read_devices or sorted({cgroup.block_device(f) for f in _files_of(cfg)})
                thr = cgroup.ReadThrottle.create(read_bps, devices, share_with=cap)
            except cgroup.ThrottleUnavailable as exc:
                thr_error = str(exc)
        joins = [g.join_self for g in (cap, thr) if g is not None]

        def enter_cgroups() -> None:  # in the child, before exec: everything it does is capped/throttled
            for join in joins:
                join()

        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env,
                                preexec_fn=enter_cgroups if joins else None)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        rc = proc.returncode
        res: dict[str, Any] = {}
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    res = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        oom = cap.oom_kills() if cap else 0
        killed = rc < 0 or oom > 0
        res.setdefault("name", cfg.get("name"))
        res.setdefault("kind", cfg.get("kind"))
        res.update({
            "returncode": rc, "killed": bool(killed and not timed_out), "timed_out": timed_out,
            "signal": signal.Signals(-rc).name if rc < 0 and -rc in signal.Signals._value2member_map_ else None,
            "oom_kills": oom, "cap_bytes": cap_bytes,
            "cgroup_peak": cap.peak() if cap else None, "cgroup_failcnt": cap.failcnt() if cap else None,
            "elapsed_s": time.perf_counter() - t0,
            "read_bps": thr.rate if thr else None, "throttled": thr is not None,
            "throttle_read_bytes": thr.read_bytes() if thr else None,
        })
        storage = res.get("bytes_read_total") or 0
        if thr is not None and storage >= 8 * MiB and res["throttle_read_bytes"] < storage / 2:
            # the worker's reads came from storage, but not through the throttled disk(s)
            res["throttled"] = False
            thr_error = (f"the worker read {storage / MiB:.0f} MiB from storage but only "
                         f"{res['throttle_read_bytes'] / MiB:.0f} MiB passed the throttled "
                         f"{', '.join(d.name for d in thr.devices)}")
        if thr_error:
            res["throttle_error"] = thr_error
        if killed or timed_out:
            res["ok"] = False
            res.setdefault("error", "timed out" if timed_out else
                           "killed by the kernel's OOM killer" if oom else f"killed by {res['signal']}")
        elif not res:
            res.update({"ok": False, "error": f"worker exited {rc} without a result: "
                                              f"{err.decode(errors='replace').strip()[-400:]}"})
        if not res.get("ok") and err:
            res["stderr_tail"] = err.decode(errors="replace").strip()[-800:]
        return res
    finally:
        if thr is not None:
            thr.close()
        if cap is not None:
            cap.close()


def prepare_throttle(rate: int, files: list[Path]) -> dict[str, Any]:
    """Set up a read throttle once, measure it, remove it: whether the runs can be throttled, and why not.

    The probe reads about one second's worth (at ``rate``) of the largest file cold, in a process in the
    throttle cgroup. It fails the throttle when the bytes came from storage but did not pass the
    throttled disk, or when they came clearly faster than the limit (only judged where the read is long
    enough: blk-throttle lets one 100 ms slice through at once). Never raises ThrottleUnavailable.
    """
    info: dict[str, Any] = {"read_bps": rate, "throttled": False, "reason": None, "mechanism": None,
                            "devices": [], "probe": None, "line": None}
    try:
        devices = sorted({cgroup.block_device(f) for f in files})
        info["devices"] = [{"device": d.name, "dev": d.dev} for d in devices]
        thr = cgroup.ReadThrottle.create(rate, devices)
        try:
            info["mechanism"], info["line"] = thr.mechanism, thr.describe()
            big = max(files, key=lambda f: f.stat().st_size)
            n = min(big.stat().st_size, rate)  # about one second of reads at the limit
            probe = thr.probe(big, n)
        finally:
            thr.close()
    except cgroup.ThrottleUnavailable as exc:
        info["reason"] = str(exc)
        return info
    n, secs = probe["bytes"], probe["seconds"]
    probe |= {"file": str(big), "bps": n / secs if secs > 0 else None}
    info["probe"] = probe
    storage = probe["storage_bytes"]
    if storage is not None and storage >= n / 2 and probe["cgroup_bytes"] < storage / 2:
        info["reason"] = (f"the probe read {storage / MiB:.0f} MiB of {big.name} from storage but only "
                          f"{probe['cgroup_bytes'] / MiB:.0f} MiB passed the throttled "
                          f"{', '.join(d['device'] for d in info['devices'])}")
        return info
    if n >= rate * 0.5 and probe["bps"] and probe["bps"] > 1.3 * rate:
        info["reason"] = (f"the limit did not take: the probe read {n / 1e6:.0f} MB cold at "
                          f"{cgroup.fmt_rate(probe['bps'])}, above the {cgroup.fmt_rate(rate)} limit")
        return info
    info["throttled"] = True
    if storage is not None and storage < n / 2:
        probe["note"] = "not verified: the probe's reads were served from the page cache"
    elif n < rate * 0.5:
        probe["note"] = "rate not verified: the model file is smaller than half a second of reads at the limit"
    elif probe["bps"] and probe["bps"] < 0.7 * rate:
        probe["note"] = "this machine's storage read slower than the limit during the probe: the limit may not bind"
    return info


# ---------------------------------------------------------------------------- the run
def _worker_cfg(name: str, spec: dict, bundles: dict[str, Path], budget: int | None, opts: BenchOptions,
                threads: int) -> dict:
    from dymoe_gguf.bench.models import model_files

    base = {"name": name, "kind": spec["kind"], "tokens": opts.tokens, "prompt_tokens": opts.prompt_tokens,
            "threads": threads, "n_ctx": max(128, opts.prompt_tokens + opts.tokens + 16), "seed": 0}
    if spec["kind"] == "stock":
        b = bundles[UNIFORM[spec["tier"]]]
        files = model_files(b, stock=True)
        base.update({"model": str(files[0]), "files": [str(f) for f in files], "repack": spec.get("repack", False),
                     "madv_random": spec.get("madv_random", False), "drop_cache": not spec.get("warm")})
    else:
        b = bundles["q4k"]
        base.update({"model": str(b), "files": [str(f) for f in model_files(b, stock=False)], "mode": spec["mode"],
                     "lookahead": spec["lookahead"], "skip": spec["skip"], "budget": budget})
    base.update(opts.extra)
    return base


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(runs: list[dict]) -> None:
    """Every run gets its ratios against the baseline (stock Q4_K repack off) at the same cap."""
    base = {r["cap_share"]: r for r in runs if r["name"] == BASELINE and r.get("ok")}
    for r in runs:
        b = base.get(r["cap_share"])
        if (not r.get("ok") or b is None or not r.get("capped", True) and b.get("capped")
                or bool(r.get("throttled")) != bool(b.get("throttled"))):
            r["tpot_speedup"] = r["ttft_speedup"] = r["bytes_ratio"] = None
            continue
        r["tpot_speedup"] = _ratio(b["tpot_s"], r["tpot_s"])
        r["ttft_speedup"] = _ratio(b["ttft_s"], r["ttft_s"])
        r["bytes_ratio"] = _ratio(r["bytes_per_token"], b["bytes_per_token"])


def _vs(b: dict | None, t: dict | None, dy: dict | None, suffix: str = "") -> dict:
    """Ratios of one dymoe run against the baseline ``b`` and tuned stock ``t``."""
    def get(r, k):
        return r[k] if r else None

    return {
        f"tpot_ratio{suffix}": _ratio(get(b, "tpot_s"), get(dy, "tpot_s")),
        f"ttft_ratio{suffix}": _ratio(get(b, "ttft_s"), get(dy, "ttft_s")),
        f"tpot_ratio_tuned{suffix}": _ratio(get(t, "tpot_s"), get(dy, "tpot_s")),
        f"ttft_ratio_tuned{suffix}": _ratio(get(t, "ttft_s"), get(dy, "ttft_s")),
        f"bytes_per_token_ratio{suffix}": _ratio(get(dy, "bytes_per_token"), get(b, "bytes_per_token")),
        f"dymoe_tpot_s{suffix}": get(dy, "tpot_s"), f"dymoe_ttft_s{suffix}": get(dy, "ttft_s"),
        f"dymoe_bytes_per_token{suffix}": get(dy, "bytes_per_token"),
    }


def headline(runs: list[dict], cap_share: float, capped: bool, read_bps: int | None = None,
             throttled: bool | None = None) -> dict:
    """tpot_ratio / ttft_ratio (baseline / dymoe), tpot_ratio_tuned (tuned / dymoe), bytes ratio, capped.

    ``read_bps``: the storage read throttle asked for (None: not asked); ``throttled`` whether it was set.

    "dymoe" is the runtime's defaults (per-expert with the patch, look-ahead 1, no skip); the same
    ratios for its skip variant carry the suffix ``_skip`` (skip changes the output: see quality).
    """
    at = {r["name"]: r for r in runs if r["cap_share"] == cap_share}

    want = bool(read_bps and throttled)  # a run whose own throttle failed is not compared with throttled ones

    def ok(r):
        return r if r is not None and r.get("ok") and bool(r.get("throttled")) == want else None

    dy = next((at[n] for n in HEADLINE if ok(at.get(n))), None)
    sk = ok(at.get(dy["name"] + "-skip")) if dy else None
    b, t = ok(at.get(BASELINE)), ok(at.get(TUNED))
    h = {"capped": capped, "read_bps": read_bps, "throttled": throttled if read_bps else None, "cap_share": cap_share,
         "cap_bytes": next((r.get("cap_bytes") for r in at.values() if r.get("cap_bytes")), None),
         "dymoe_config": dy["name"] if dy else None, "dymoe_skip_config": sk["name"] if sk else None}
    h |= _vs(b, t, dy)
    h |= {"baseline_tpot_s": b["tpot_s"] if b else None, "tuned_tpot_s": t["tpot_s"] if t else None,
          "baseline_ttft_s": b["ttft_s"] if b else None, "tuned_ttft_s": t["ttft_s"] if t else None,
          "baseline_bytes_per_token": b["bytes_per_token"] if b else None,
          "tuned_bytes_per_token": t["bytes_per_token"] if t else None}
    if sk:
        h |= _vs(b, t, sk, "_skip")
    if not capped:
        h["note"] = "uncapped: no memory cap could be set, these ratios are not under memory pressure"
    if read_bps and not throttled:
        h["throttle_note"] = ("unthrottled: storage reads could not be throttled, these runs read at this "
                              "machine's own storage speed")
    return h


def run_quality(opts: BenchOptions, rel_budget: float | None, threads: int, mode: str,
                log: Callable[[str], None], skip: bool = False) -> dict:
    """ppl / KL / top-1 on the trained model: uniform Q2_K, Q4_K, Q8_0 and dymoe at ``rel_budget`` x Q4_K experts."""
    src = find_trained()
    text = Path(__file__).resolve().parents[2] / "data" / "heldout.txt"
    if src is None or not text.is_file():
        return {"skipped": "the trained model (models/tiny-moe) or data/heldout.txt is not present"}
    bundle = ensure_trained_bundle(src, root=opts.cache_root, threads=threads, log=log)
    chunks = opts.quality_chunks or (16 if opts.quick else None)
    base = {"kind": "quality", "model": str(bundle), "text": str(text), "ctx": 256, "chunks": chunks,
            "threads": threads}
    rows = []
    for tier in ("Q2_K", "Q4_K", "Q8_0"):
        rows.append(dict(base, name=f"uniform {tier}", policy=f"uniform:{tier}"))
    budget = None
    if rel_budget is not None:
        budget = int(rel_budget * q4k_expert_bytes(bundle))
        rows.append(dict(base, name=f"dymoe {mode} @ {100 * rel_budget:.0f}% of Q4_K experts", policy="dymoe",
                         mode=mode, lookahead=1, budget=budget))
        if skip:
            rows.append(dict(base, name=f"dymoe {mode} + skip < {SKIP_THRESHOLD} @ {100 * rel_budget:.0f}% of Q4_K "
                                        "experts", policy="dymoe", mode=mode, lookahead=1, budget=budget,
                             skip=SKIP_THRESHOLD))
    out = []
    for cfg in rows:
        log(f"quality: {cfg['name']}")
        out.append(run_worker(cfg, None, opts.timeout))
    return {"model": str(src), "bundle": str(bundle), "text": str(text), "ctx": 256, "chunks": chunks,
            "reference": "the same model at F16 (the bundle's base)", "rel_budget": rel_budget,
            "budget_bytes": budget, "rows": out}


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the benchmark; writes result.json, report.md and plots into ``opts.out``; returns the result."""
    from dymoe_gguf.bench import report

    t_start = time.perf_counter()
    threads = opts.threads or os.cpu_count() or 1
    model = opts.model or BenchModel(n_layer=opts.layers or (2 if opts.quick else 4))
    names = list(opts.configs or (QUICK_CONFIGS if opts.quick else FULL_CONFIGS))
    rate = cgroup.parse_rate(opts.read_bps) if opts.read_bps is not None else None
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise DymoeError(f"Unknown bench configuration(s) {', '.join(unknown)}: expected some of {', '.join(CONFIGS)}")
    has_patch = patch_available()
    notes = []
    if not has_patch:
        dropped = [n for n in names if CONFIGS[n].get("mode") == "per-expert"]
        names = [n for n in names if n not in dropped]
        if dropped and "dymoe-layer" not in names:
            names.append("dymoe-layer")
        notes.append("this llama.cpp build is stock (no per-expert patch): per-expert configurations were "
                     f"skipped ({', '.join(dropped) or 'none'})")
    keys = sorted({UNIFORM[CONFIGS[n]["tier"]] for n in names if CONFIGS[n]["kind"] == "stock"} | {"q4k"})
    bundles = ensure_bundles(model, keys, root=opts.cache_root, threads=threads, log=log)
    q4k_size = (bundles["q4k"] / "model.gguf").stat().st_size
    cap_main = parse_cap(opts.cap, q4k_size)
    shares = [cap_main / q4k_size] + [s for s in (opts.sweep or ()) if abs(s * q4k_size - cap_main) > MiB]
    reason = cgroup.why_unavailable()
    capped = reason is None
    if capped:  # the machine may still refuse: try once
        try:
            cgroup.MemoryCap.create(64 * MiB).close()
        except cgroup.CapUnavailable as exc:
            capped, reason = False, str(exc)
    throttle = None
    if rate is not None:
        throttle = prepare_throttle(rate, sorted({f for b in bundles.values() for f in b.glob("*.gguf")}))
        p = throttle["probe"] or {}
        log(("S" + throttle["line"][1:] + (f" (probe: {cgroup.fmt_rate(p['bps'])})" if p.get("bps") else ""))
            if throttle["throttled"] else
            f"UNTHROTTLED: storage reads could not be throttled to {cgroup.fmt_rate(rate)}: {throttle['reason']}")
    read_bps = rate if throttle and throttle["throttled"] else None
    read_devices = ([cgroup.BlockDevice(*map(int, d["dev"].split(":")), d["device"]) for d in throttle["devices"]]
                    if read_bps and throttle else None)
    runs = []
    for share in shares:
        cap_bytes = int(share * q4k_size)
        budget = expert_budget(cap_bytes, bundles["q4k"], opts.allowance)
        for name in names:
            spec = CONFIGS[name]
            if spec.get("warm") and share != shares[0]:
                continue  # compute time: once is enough
            cfg = _worker_cfg(name, spec, bundles, budget, opts, threads)
            use_cap = cap_bytes if capped and not spec.get("warm") else None
            log(f"cap {cap_bytes / MiB:.0f} MiB: {name} ...")
            r = run_worker(cfg, use_cap, opts.timeout, read_bps=read_bps, read_devices=read_devices)
            if r.get("throttle_error"):
                log(f"    UNTHROTTLED: {r['throttle_error']}")
            r.update({"cap_share": share, "desc": spec["desc"], "budget": budget if spec["kind"] == "dymoe" else None,
                      "capped": use_cap is not None})
            if r.get("ok"):
                log(f"    TTFT {r['ttft_s']:.2f} s, TPOT {1000 * r['tpot_s']:.1f} ms, "
                    f"{r['bytes_per_token'] / MiB:.1f} MiB read/token, peak RSS {r['peak_rss'] / MiB:.0f} MiB")
            else:
                log(f"    {r.get('error')}")
            runs.append(r)
    add_ratios(runs)
    head = headline(runs, shares[0], capped, rate, throttle["throttled"] if throttle else None)
    quality: dict[str, Any] = {"skipped": "not asked for (--no-quality)"}
    if opts.quality:
        dy = next((r for r in runs if r["name"] == head["dymoe_config"] and r["cap_share"] == shares[0]), None)
        rel = dy["budget"] / q4k_expert_bytes(bundles["q4k"]) if dy else None
        mode = "per-expert" if has_patch else "per-layer"
        quality = run_quality(opts, rel, threads, mode, log, skip=head.get("dymoe_skip_config") is not None)
    result = {
        "version": 1, "capped": capped, "cap_reason": reason, "cap_bytes": cap_main, "cap_shares": shares,
        "read_bps": rate, "throttle": throttle,
        "quick": opts.quick, "model": asdict(model), "model_desc": model.describe(),
        "model_sizes": {k: {f.name: f.stat().st_size for f in sorted(p.glob("*.gguf"))} for k, p in bundles.items()},
        "q4k_model_bytes": q4k_size, "q4k_expert_bytes": q4k_expert_bytes(bundles["q4k"]),
        "non_expert_bytes": non_expert_bytes(bundles["q4k"]), "runtime_allowance": opts.allowance,
        "tokens": opts.tokens, "prompt_tokens": opts.prompt_tokens, "threads": threads,
        "patched_build": has_patch, "machine": machine_info(bundles["q4k"] / "model.gguf"),
        "configs": names, "runs": runs, "headline": head, "quality": quality, "notes": notes,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.perf_counter() - t_start))),
    }
    result["projection"] = report.projection(result)
    result["seconds"] = time.perf_counter() - t_start
    report.write_all(result, opts.out)
    return result
