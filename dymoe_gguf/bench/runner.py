"""One benchmark process in its own cgroups: the memory cap, the storage read throttle, and what came of it.

Every outcome of a configuration is a result, never a failure of the benchmark: a JSON line from the
worker (``ok`` true or false), a death by the OOM killer under the cap ("killed for memory"), a crash
("crashed: SIGSEGV" — llama.cpp's AMX / repack paths do that on some CPUs), a timeout.

:func:`prepare_throttle` checks once that a read throttle can be set and that it binds;
:func:`measure_read_bandwidth` times a cold sequential read inside the same cgroups, the bandwidth the
physical bound (:mod:`dymoe_gguf.bench.compare`) divides by.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dymoe_gguf.bench import cgroup, throttle
from dymoe_gguf.bench.throttle import BlockDevice, ReadThrottle, ThrottleUnavailable, fmt_limits, fmt_rate

MiB = 1 << 20
# Deaths by these signals are the process's own fault (a crash), not the kernel ending it.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGTRAP}


def files_of(cfg: dict) -> list[Path]:
    """The model files a configuration reads (what a read throttle must cover)."""
    files = [Path(f) for f in cfg.get("files") or ()]
    model = Path(cfg["model"]) if cfg.get("model") else None
    if model is not None and model.is_file():
        files.append(model)
    elif model is not None and model.is_dir():
        files += sorted(model.glob("*.gguf"))
    return files


def _signal_name(rc: int) -> str | None:
    try:
        return signal.Signals(-rc).name if rc < 0 else None
    except ValueError:
        return f"signal {-rc}"


def _last_json(out: bytes) -> dict[str, Any]:
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def run_worker(cfg: dict, cap_bytes: int | None, timeout: float, env: dict | None = None,
               entry: list[str] | None = None, read_bps: int | None = None, read_iops: int | None = None,
               read_devices: list[BlockDevice] | None = None) -> dict:
    """Run one configuration in its own process (in its own memory cgroup when ``cap_bytes``).

    ``read_bps`` / ``read_iops`` throttle the process's storage reads on ``read_devices`` (default: the
    disks holding the configuration's files); where that cannot be set up the run goes on unthrottled and
    says so (``throttled: false``, ``throttle_error``). ``entry`` replaces ``[python, -m,
    dymoe_gguf.bench.worker]`` (the JSON config is its last argument).
    """
    cap = cgroup.MemoryCap.create(cap_bytes) if cap_bytes else None
    thr: ReadThrottle | None = None
    thr_error: str | None = None
    cmd = (entry or [sys.executable, "-m", "dymoe_gguf.bench.worker"]) + [json.dumps(cfg)]
    run_env = dict(os.environ if env is None else env)
    run_env.pop("DYMOE_NO_POPULATE", None)  # only the controller turns it on, for itself
    t0 = time.perf_counter()
    timed_out = False
    try:
        if read_bps or read_iops:
            try:
                devices = read_devices or sorted({throttle.block_device(f) for f in files_of(cfg)})
                thr = ReadThrottle.create(devices, bps=read_bps, iops=read_iops, share_with=cap)
            except ThrottleUnavailable as exc:
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
        res = _last_json(out)
        oom = cap.oom_kills() if cap else 0
        sig = _signal_name(rc)
        crashed = rc < 0 and not oom and not timed_out and -rc in {int(s) for s in CRASH_SIGNALS}
        killed = (rc < 0 or oom > 0) and not crashed and not timed_out
        res.setdefault("name", cfg.get("name"))
        res.setdefault("kind", cfg.get("kind"))
        res.update({
            "returncode": rc, "killed": bool(killed), "crashed": bool(crashed), "timed_out": timed_out,
            "signal": sig, "oom_kills": oom, "cap_bytes": cap_bytes,
            "cgroup_peak": cap.peak() if cap else None, "cgroup_failcnt": cap.failcnt() if cap else None,
            "elapsed_s": time.perf_counter() - t0,
            "read_bps": thr.bps if thr else None, "read_iops": thr.iops if thr else None,
            "throttled": thr is not None,
            "throttle_read_bytes": thr.read_bytes() if thr else None,
            "throttle_read_ios": thr.read_ios() if thr else None,
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
        if killed or crashed or timed_out:
            res["ok"] = False
            res["error"] = ("timed out" if timed_out else f"crashed: {sig}" if crashed else
                            "killed for memory (the kernel's OOM killer)" if oom else f"killed by {sig}")
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


def measure_read_bandwidth(file: Path, nbytes: int, cap_bytes: int | None, *, read_bps: int | None = None,
                           read_iops: int | None = None, read_devices: list[BlockDevice] | None = None,
                           timeout: float = 300.0) -> dict[str, Any]:
    """A cold sequential read of ``nbytes`` of ``file`` in the configurations' cgroups (cap and throttle).

    Returns the probe's result (``bps``, ``bytes``, ``storage_bytes``, ``seconds``) with ``ok``; ``bps`` is
    None where the bytes did not come from storage (the page cache served them) or the probe failed.
    """
    cfg = {"name": "read-bandwidth", "kind": "read", "files": [str(file)]}
    entry = [sys.executable, "-c", throttle.PROBE, str(file), str(int(nbytes)), "seq"]
    r = run_worker(cfg, cap_bytes, timeout, entry=entry, read_bps=read_bps, read_iops=read_iops,
                   read_devices=read_devices)
    storage = r.get("storage_bytes")
    if not r.get("ok") or (storage is not None and storage < r.get("bytes", 0) / 2):
        r["note"] = r.get("error") or "the read was served from the page cache: no storage bandwidth measured"
        r["bps"] = None
    return r


def prepare_throttle(files: list[Path], *, bps: int | None = None, iops: int | None = None) -> dict[str, Any]:
    """Set up a read throttle once, measure it, remove it: whether the runs can be throttled, and why not.

    With a bandwidth limit, one second's worth (at ``bps``) of the largest file is read cold in 4 MiB
    ``pread``s; with an IOPS limit, up to one second's worth of single-page reads at random offsets, in a
    process in the throttle cgroup. The throttle fails when the bytes came from storage but did not pass
    the throttled disk, or clearly faster than the limit (judged only where the probe is long enough:
    blk-throttle lets one 100 ms slice through at once). Never raises ThrottleUnavailable.
    """
    info: dict[str, Any] = {"read_bps": bps, "read_iops": iops, "throttled": False, "reason": None,
                            "mechanism": None, "devices": [], "probe": None, "probe_iops": None, "line": None}
    try:
        devices = sorted({throttle.block_device(f) for f in files})
        info["devices"] = [{"device": d.name, "dev": d.dev} for d in devices]
        thr = ReadThrottle.create(devices, bps=bps, iops=iops)
        try:
            info["mechanism"], info["line"] = thr.mechanism, thr.describe()
            big = max(files, key=lambda f: f.stat().st_size)
            size = big.stat().st_size
            if bps:
                info["probe"] = thr.probe(big, min(size, bps)) | {"file": str(big)}
            if iops:
                info["probe_iops"] = thr.probe(big, 4096 * min(iops, 20_000), random_4k=True) | {"file": str(big)}
        finally:
            thr.close()
    except ThrottleUnavailable as exc:
        info["reason"] = str(exc)
        return info
    devs = ", ".join(d["device"] for d in info["devices"])
    for key, limit, unit in (("probe", bps, "bps"), ("probe_iops", iops, "iops")):
        p = info[key]
        if p is None or not limit:
            continue
        n, storage, big = p["bytes"], p["storage_bytes"], Path(p["file"])
        if storage is not None and storage >= n / 2 and p["cgroup_bytes"] < storage / 2:
            info["reason"] = (f"the probe read {storage / MiB:.0f} MiB of {big.name} from storage but only "
                              f"{p['cgroup_bytes'] / MiB:.0f} MiB passed the throttled {devs}")
            return info
        amount = n if unit == "bps" else p["reads"]
        if amount >= limit * 0.5 and p[unit] > 1.3 * limit:
            got = fmt_rate(p["bps"]) if unit == "bps" else f"{p['iops']:.0f} IOPS"
            info["reason"] = f"the limit did not take: the probe read {big.name} cold at {got}, above " \
                             f"the {fmt_limits(bps if unit == 'bps' else None, iops if unit == 'iops' else None)} limit"
            return info
        if storage is not None and storage < n / 2:
            p["note"] = "not verified: the probe's reads were served from the page cache"
        elif amount < limit * 0.5:
            p["note"] = "rate not verified: the probe was shorter than half a second of reads at the limit"
        elif p[unit] < 0.7 * limit:
            p["note"] = "this machine's storage read slower than the limit during the probe: the limit may not bind"
    info["throttled"] = True
    return info
