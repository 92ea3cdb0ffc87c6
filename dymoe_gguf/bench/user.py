"""``dymoe-gguf bench -m BUNDLE``: llama-bench for the user's own bundle, on the user's own storage.

Like ``llama-bench``, two tests per configuration, repeated ``-r`` times after one untimed warm-up:
``ppN`` evaluates N random prompt tokens as one batch (prompt processing), ``tgN`` decodes N tokens one
at a time from an empty context (text generation, :func:`dymoe_gguf.bench.timing.decode_times`); each
reports tokens per second as mean ± sample standard deviation over the repetitions. Tokens are random
(seeded), as llama-bench's are. Configurations, each in its own process (a crash is a result):

* ``dymoe``: the controller with the runtime's defaults under ``--budget`` (policy, mode, look-ahead
  as ``run`` would use them);
* ``stock`` (``--compare-stock``): plain llama.cpp on the bundle's ``model.gguf``, repack off (the
  product never depends on llama.cpp's extra buffer types), no eval callback.

Nothing is capped or throttled: this measures the user's machine as it is (the page cache is warm after
the warm-up, as in llama-bench; with a budget, dymoe still reads what its budget does not hold).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dymoe_gguf.bench.timing import decode_times, mean_std


def measure(cfg: dict) -> dict[str, Any]:
    """One configuration (in a worker process): warm-up, then ``reps`` x (ppN, tgN); tokens/s per rep."""
    from dymoe_gguf._native.llama import open_llama

    n_p, n_g, reps = int(cfg["n_prompt"]), int(cfg["n_gen"]), int(cfg["reps"])
    kw = {"n_ctx": max(64, n_p + n_g + 8), "n_batch": max(32, n_p), "n_ubatch": max(32, min(n_p, 512)),
          "n_threads": cfg.get("threads"), "n_threads_batch": cfg.get("threads")}
    ctl = None
    if cfg["config"] == "stock":
        from dymoe_gguf.bundle import BundleIndex

        llm = open_llama(BundleIndex(Path(cfg["bundle"])).base_path, repack=False, **kw)
    else:
        from dymoe_gguf.runtime.controller import Controller

        ctl = Controller.open(cfg["bundle"], memory_budget=cfg.get("budget"), **(cfg.get("options") or {}))
        llm = ctl.llama(**kw)
    try:
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        vocab = llm.n_vocab()
        bos = llm.token_bos()
        pp: list[float] = []
        tg: list[float] = []
        for rep in range(reps + 1):  # rep 0: warm-up
            if n_p:
                prompt = rng.integers(0, vocab, n_p).tolist()
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                dt = time.perf_counter() - t0
                if rep:
                    pp.append(n_p / dt)
            if n_g:
                llm.reset()
                llm.eval([bos if bos >= 0 else 0])
                steps = decode_times(llm, rng.integers(0, vocab, n_g).tolist())
                if rep:
                    tg.append(n_g / sum(steps))
        stats = ctl.stats().to_dict() if ctl is not None else None
        if stats:
            stats.pop("tiers_by_layer", None)
        threads = llm.n_threads  # before close: a closed controller's Llama refuses every use
    finally:
        if ctl is not None:
            ctl.close()
        else:
            llm.close()
    return {"config": cfg["config"], "pp_ts": pp, "tg_ts": tg, "controller": stats, "threads": threads}


def _describe(res: dict) -> str:
    if res["config"] == "stock":
        return "stock llama.cpp (repack off)"
    c = res.get("controller") or {}
    return f"dymoe {c.get('mode', '')}".strip()


def bench_bundle(bundle: Path, *, budget: str | int | None = None, n_prompt: int = 512, n_gen: int = 128,
                 reps: int = 5, compare_stock: bool = False, threads: int | None = None,
                 options: dict[str, Any] | None = None, timeout: float = 3600.0,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Prompt and generation tokens/s of ``bundle`` (and stock llama.cpp on its base with ``compare_stock``)."""
    from dymoe_gguf.bench.runner import run_worker
    from dymoe_gguf.bench.tables import failure
    from dymoe_gguf.bundle import BundleIndex
    from dymoe_gguf.runtime.config import parse_budget

    idx = BundleIndex(Path(bundle))  # validates: a bad bundle is one clear error before anything runs
    budget_b = parse_budget(budget)
    base = {"kind": "llama_bench", "bundle": str(bundle), "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps,
            "threads": threads, "budget": budget_b, "options": options or {}, "seed": 0}
    rows, runs = [], []
    for config in ["dymoe"] + (["stock"] if compare_stock else []):
        log(f"bench -m: {config} ({reps} repetitions of pp{n_prompt} and tg{n_gen} after one warm-up)")
        r = run_worker(dict(base, config=config, name=config), None, timeout)
        runs.append(r)
        desc = _describe(r) if r.get("ok") else config
        for test, key, n in (("pp", "pp_ts", n_prompt), ("tg", "tg_ts", n_gen)):
            if not n:
                continue
            ts = r.get(key) or []
            avg, sd = mean_std(ts) if r.get("ok") else (None, None)
            rows.append({"config": config, "desc": desc, "test": f"{test}{n}", "n_prompt": n if test == "pp" else 0,
                         "n_gen": n if test == "tg" else 0, "ts": ts, "avg_ts": avg, "stddev_ts": sd,
                         "ok": bool(r.get("ok")), "error": None if r.get("ok") else failure(r)})
    dy = next((x for x in runs if x.get("config") == "dymoe" and x.get("ok")), None)
    c = (dy or {}).get("controller") or {}
    return {"bundle": str(bundle), "model_bytes": idx.base_path.stat().st_size, "budget_bytes": budget_b,
            "threads": threads or next((x["threads"] for x in runs if x.get("threads")), None),
            "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "results": rows,
            "controller": {k: c.get(k) for k in ("mode", "resident_expert_bytes", "max_resident_expert_bytes",
                                                 "hit_rate", "lookahead_recall", "bytes_read", "callback_seconds")}}


def render(res: dict) -> str:
    """The results as llama-bench prints them: one row per (configuration, test), t/s mean ± stddev."""
    from dymoe_gguf.util import human_bytes

    name = Path(res["bundle"]).name
    budget = human_bytes(res["budget_bytes"]) if res["budget_bytes"] else "unlimited"
    lines = ["| model | size | configuration | budget | threads | test | t/s |", "|---|---:|---|---:|---:|---|---:|"]
    for r in res["results"]:
        ts = f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}" if r["ok"] else r["error"]
        lines.append(f"| {name} | {human_bytes(res['model_bytes'])} | {r['desc']} | "
                     f"{budget if r['config'] == 'dymoe' else '—'} | {res['threads'] or 'default'} | {r['test']} | "
                     f"{ts} |")
    c = res.get("controller") or {}
    if c.get("mode"):
        lines += ["", f"dymoe: {c['mode']}, resident experts ≤ {human_bytes(c.get('max_resident_expert_bytes') or 0)}"
                  + (f", hit rate {c['hit_rate']:.0%}" if c.get("hit_rate") is not None else "")
                  + (f", look-ahead recall {c['lookahead_recall']:.0%}" if c.get("lookahead_recall") is not None
                     else "")]
    return "\n".join(lines)

