"""One benchmark configuration, in its own process: ``python -m dymoe_gguf.bench.worker '<json config>'``.

Prints exactly one JSON line (the result) on stdout. The parent puts this process in the memory
cgroup before it starts (so everything it touches is charged to the cap) and records a death by
signal (the OOM killer) as ``"killed": true`` — the worker itself cannot.

What is timed, from a cold page cache (``posix_fadvise(DONTNEED)`` on every file of the model):

* ``ttft_s``  — open the model (stock: llama.cpp's load, which reads the whole file unless the
  patch's no-populate is on; dymoe: load, warm-up decode, attach, initial warming) + evaluate the
  prompt + pick the first token: the time a user waits after starting the program;
* ``tpot_s``  — median over ``tokens`` single-token decode steps (``llm.eval([tok])`` + argmax,
  :func:`dymoe_gguf.bench.timing.decode_times`). Decode steps feed a fixed, seeded token sequence (the
  same in every configuration), so every configuration routes the same inputs; greedy output of a
  random-weight model would loop on a few tokens and make routing unrealistically repetitive.
* ``callback_share`` — the controller's eval-callback seconds during those steps ÷ their time (on the
  Python hot path they include its demand reads, on the C one they do not: ``miss_s_per_token``);
  ``callback_s_per_layer_token`` the hot path's own seconds (reads not counted) ÷ (steps × MoE layers).

Measured alongside: bytes read from storage (``/proc/self/io`` read_bytes, all threads, including the
pager's prefetches), major page faults (``getrusage``), peak RSS (``VmHWM`` and psutil samples),
resident model bytes (``mincore`` over every model file), and the controller's own stats.

Config keys: ``kind`` (stock | dymoe | quality), ``model`` (stock: a GGUF; dymoe/quality: a bundle),
``files`` (dropped from the cache first), ``repack``, ``madv_random`` (stock), ``policy``, ``mode``,
``lookahead``, ``skip``, ``budget`` and ``options`` (any other :class:`~dymoe_gguf.runtime.config.RuntimeConfig`
field, passed to ``Controller.open``) (dymoe, quality), ``prompt_tokens``, ``tokens``, ``threads``,
``n_ctx``, ``seed``, ``drop_cache`` (default true), and for tests ``allocate`` (bytes of anonymous
memory to touch first) and ``self_kill`` (die by SIGKILL).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from dymoe_gguf._native import vm
from dymoe_gguf.bench.timing import decode_times, eval_prompt


# ---------------------------------------------------------------------------- measurements
def resident_bytes(files: list[str]) -> dict[str, int]:
    """Page-cache residency (mincore) of whole files, in bytes per file."""
    out = {}
    for f in files:
        m = vm.Mapping.open(f)  # a fresh read-only mapping: mincore reports the file's page cache
        try:
            out[f] = int(m.residency().sum()) * vm.PAGE
        finally:
            m.close()
    return out


def proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, bytes."""
    keys = {"VmHWM", "VmRSS", "RssAnon", "RssFile"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class Meter:
    """Counters at a point in time; ``since()`` gives the deltas."""

    def __init__(self) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.t = time.perf_counter()
        self.read = vm.read_bytes()
        self.majflt = ru.ru_majflt
        self.cpu = ru.ru_utime + ru.ru_stime

    def since(self, start: Meter) -> dict[str, float]:
        return {"seconds": self.t - start.t, "bytes_read": self.read - start.read,
                "major_faults": self.majflt - start.majflt, "cpu_seconds": self.cpu - start.cpu}


# ---------------------------------------------------------------------------- opening a model
def _open(cfg: dict) -> tuple[Any, Any]:
    """(llm, controller or None) for a configuration."""
    n = {"n_ctx": cfg.get("n_ctx", 512), "n_threads": cfg["threads"], "n_threads_batch": cfg["threads"],
         "n_batch": cfg.get("n_ctx", 512)}
    if cfg["kind"] == "stock":
        from dymoe_gguf._native.llama import open_llama

        os.environ.pop("DYMOE_NO_POPULATE", None)  # stock: patch features off
        llm = open_llama(cfg["model"], repack=bool(cfg.get("repack", False)), **n)
        if cfg.get("madv_random"):
            ranges = vm.file_mappings(cfg["model"])
            if not ranges:
                raise RuntimeError(f"no mapping of {cfg['model']} found in /proc/self/maps")
            for addr, length, _off in ranges:
                err = vm.madvise(addr, length, vm.MADV_RANDOM)
                if err:
                    raise OSError(err, "madvise(MADV_RANDOM) failed on the model mapping")
        return llm, None
    from dymoe_gguf.runtime.controller import Controller

    ctl = Controller.open(cfg["model"], memory_budget=cfg.get("budget"), policy=cfg.get("policy", "dymoe"),
                          **runtime_options(cfg))
    try:
        llm = ctl.llama(**n)
    except BaseException:
        ctl.close()
        raise
    return llm, ctl


def runtime_options(cfg: dict) -> dict[str, Any]:
    """``Controller.open`` options of a dymoe/quality configuration: ``mode``, ``lookahead``, ``skip`` and
    everything in ``options`` (RuntimeConfig fields: the knobs a Pareto sweep varies)."""
    out: dict[str, Any] = {}
    if "mode" in cfg:
        out["mode"] = cfg["mode"]
    if "lookahead" in cfg:
        out["lookahead"] = int(cfg["lookahead"])
    if cfg.get("skip"):
        out["skip_threshold"] = float(cfg["skip"])
    return out | dict(cfg.get("options") or {})


# ---------------------------------------------------------------------------- one configuration
def run_speed(cfg: dict) -> dict:
    """Open, prompt, decode; every measurement of one configuration."""
    files = [str(f) for f in cfg["files"]]
    res: dict[str, Any] = {"name": cfg.get("name"), "kind": cfg["kind"]}
    if cfg.get("drop_cache", True):
        for f in files:
            vm.drop_file_cache(f)
    res["resident_at_start"] = sum(resident_bytes(files).values())
    proc = psutil.Process()
    rss_peak = proc.memory_info().rss

    m0 = Meter()
    llm, ctl = _open(cfg)
    m1 = Meter()
    try:
        n_vocab = llm.n_vocab()
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        prompt = rng.integers(0, n_vocab, int(cfg.get("prompt_tokens", 32))).tolist()
        feed = rng.integers(0, n_vocab, int(cfg["tokens"])).tolist()
        first = eval_prompt(llm, prompt)
        m2 = Meter()
        rss_peak = max(rss_peak, proc.memory_info().rss)
        s0 = ctl.stats() if ctl is not None else None
        cb0, miss0 = (s0.callback_seconds, s0.miss_seconds) if s0 is not None else (0.0, 0.0)

        def sample_rss() -> None:
            nonlocal rss_peak
            rss_peak = max(rss_peak, proc.memory_info().rss)

        steps = decode_times(llm, feed, first=first, on_step=sample_rss)
        m3 = Meter()
        stats = ctl.stats().to_dict() if ctl is not None else None
        n_moe = len(stats.pop("tiers_by_layer", None) or []) if stats else 0
        # the hot path's own cost: the Python callback's seconds include its demand reads, the C path's do not
        miss = stats["miss_seconds"] - miss0 if stats else 0.0
        hot = (stats["callback_seconds"] - cb0 - (miss if stats["hot_path"] == "python" else 0.0)) if stats else None
    finally:
        if ctl is not None:
            ctl.close()
        else:
            llm.close()
    load, prompt_d, decode = m1.since(m0), m2.since(m1), m3.since(m2)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    n = len(steps)
    res.update({
        "first_token": first,
        "load_s": load["seconds"], "prompt_s": prompt_d["seconds"],
        "ttft_s": load["seconds"] + prompt_d["seconds"],
        "tpot_s": statistics.median(steps), "tpot_mean_s": sum(steps) / n,
        "tpot_p90_s": float(np.percentile(steps, 90)), "tokens": n, "step_s": [round(s, 5) for s in steps],
        "bytes_read_load": load["bytes_read"], "bytes_read_prompt": prompt_d["bytes_read"],
        "bytes_read_decode": decode["bytes_read"], "bytes_per_token": decode["bytes_read"] / n,
        "bytes_read_total": m3.read - m0.read,
        "major_faults_load": load["major_faults"], "major_faults_prompt": prompt_d["major_faults"],
        "major_faults_decode": decode["major_faults"], "major_faults_per_token": decode["major_faults"] / n,
        "cpu_s_per_token": decode["cpu_seconds"] / n,
        "callback_s_per_token": (stats["callback_seconds"] - cb0) / n if stats else None,
        "callback_share": (stats["callback_seconds"] - cb0) / sum(steps) if stats else None,
        # the hot path's cost per MoE layer per token, its reads of missing experts not counted (target <= 50 us)
        "callback_s_per_layer_token": hot / (n * n_moe) if stats and n_moe else None,
        "miss_s_per_token": miss / n if stats else None,
        # VmHWM, not ru_maxrss: the latter keeps the parent's high-water mark across fork + exec
        "peak_rss": max(rss_peak, proc_status().get("VmHWM", 0)), "ru_maxrss": ru.ru_maxrss * 1024,
        "resident_model_bytes": sum(resident_bytes(files).values()),
        "controller": stats,
    })
    res.update({k.lower(): v for k, v in proc_status().items()})
    return res


def run_quality(cfg: dict) -> dict:
    """ppl / KL / top-1 of a bundle under a policy on held-out text (see :func:`dymoe_gguf.quality.eval.evaluate`)."""
    from dymoe_gguf.quality.eval import evaluate

    kw: dict[str, Any] = runtime_options(cfg)
    if cfg.get("budget") is not None:
        kw["memory_budget"] = cfg["budget"]
    r = evaluate(Path(cfg["model"]), Path(cfg["text"]), ctx=int(cfg.get("ctx", 256)),
                 max_chunks=cfg.get("chunks"), policy=cfg.get("policy", "off"), n_threads=cfg["threads"], **kw)
    d = r.to_dict()
    st = d.pop("stats", None) or {}
    skipped = None
    if cfg.get("skip") and st.get("skipped_slots") is not None and st.get("tokens"):
        from dymoe_gguf.bench.routing import top_k
        from dymoe_gguf.bundle import BundleIndex

        idx = BundleIndex(Path(cfg["model"]))
        k = top_k(idx)
        skipped = st["skipped_slots"] / (st["tokens"] * len(idx.moe_layers) * k) if k else None
    return {"name": cfg.get("name"), "kind": "quality", "ppl": d["ppl"], "kl": d["kl_mean"], "kl_p99": d["kl_p99"],
            "top1": d["top1"], "tokens": d["tokens"], "policy": d["policy"],
            "resident_expert_bytes": st.get("max_resident_expert_bytes"), "budget": cfg.get("budget"),
            "skipped_share": skipped}


def run_routing(cfg: dict) -> dict:
    """Routing statistics of a bundle (:func:`dymoe_gguf.bench.routing.routing_stats`)."""
    from dymoe_gguf.bench.routing import routing_stats

    return routing_stats(Path(cfg["model"]), Path(cfg["text"]), chunks=cfg.get("chunks", 8),
                         threads=cfg.get("threads"), calibrated=Path(cfg["calibrated"]) if cfg.get("calibrated")
                         else None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    cfg.setdefault("threads", os.cpu_count() or 1)
    if cfg.get("allocate"):  # tests: exceed the cap with anonymous memory
        block = bytearray(int(cfg["allocate"]))
        for i in range(0, len(block), 4096):
            block[i] = 1
    if cfg.get("self_kill"):  # tests: die as the OOM killer would kill
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.perf_counter()
    try:
        if cfg["kind"] == "llama_bench":
            from dymoe_gguf.bench.user import measure as run
        else:
            run = {"quality": run_quality, "routing": run_routing}.get(cfg["kind"], run_speed)
        res = run(cfg)
        res["ok"] = True
    except Exception as exc:  # a configuration that fails is a result too
        res = {"name": cfg.get("name"), "kind": cfg.get("kind"), "ok": False,
               "error": f"{type(exc).__name__}: {exc}"}
    res["wall_s"] = time.perf_counter() - t0
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
