"""Runtime targets of the controller issue, measured in one run on one bundle.

    .venv/bin/python scripts/bench_runtime.py BUNDLE [--tokens 2000] [--budget-share 0.5] [--json]

1. TPOT with everything resident: plain llama-cpp-python (defaults, repack on), plain with repack off,
   Controller policy "off", and Controller "dymoe" without a budget (callback, importance, look-ahead)
   — rounds interleaved, medians of per-token times, ratios against plain.
2. Look-ahead recall for the next layer (policy dymoe, look-ahead 1) over the generation.
3. Resident expert bytes under a budget (``--budget-share``: a share of the bundle's Q4_K expert bytes)
   sampled by a thread every 10 ms through a generation of ``--tokens`` tokens: the maximum against the
   budget.

TPOT is timed by the benchmarks' one decode loop (:func:`dymoe_gguf.bench.timing.decode_times`: greedy,
8 untimed warm-up steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from dymoe_gguf import Controller
from dymoe_gguf._native.llama import open_llama
from dymoe_gguf.bench.timing import decode_times, eval_prompt
from dymoe_gguf.bundle import BundleIndex, Tier

PROMPT = "The history of the city begins"


def per_token_times(llm, n: int, prompt: str = PROMPT) -> list[float]:
    """Per-token decode times (s) of ``n`` greedy tokens after ``prompt`` (8 warm-up steps first)."""
    first = eval_prompt(llm, llm.tokenize(prompt.encode(), add_bos=True))
    return decode_times(llm, n, first=first, warmup=8)


def tpot_table(bundle: Path, n: int, rounds: int, threads: int) -> dict:
    base = BundleIndex(bundle).base_path
    configs = {
        "plain (repack on)": lambda: (None, open_llama(base, repack=True, n_ctx=512, n_threads=threads)),
        "plain (repack off)": lambda: (None, open_llama(base, repack=False, n_ctx=512, n_threads=threads)),
        "controller off": lambda: _ctl(bundle, "off", threads),
        "controller dymoe (no budget)": lambda: _ctl(bundle, "dymoe", threads),
    }
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, make in configs.items():
            ctl, llm = make()
            try:
                samples[name] += per_token_times(llm, n)
            finally:
                (ctl.close() if ctl is not None else llm.close())
    med = {k: statistics.median(v) for k, v in samples.items()}
    ref = med["plain (repack on)"]
    return {k: {"tpot_ms": round(v * 1e3, 3), "ratio_vs_plain": round(v / ref, 3)} for k, v in med.items()}


def _ctl(bundle: Path, policy: str, threads: int, **kw):
    ctl = Controller.open(bundle, policy=policy, **kw)
    return ctl, ctl.llama(n_ctx=4096, n_threads=threads)


def budget_run(bundle: Path, tokens: int, share: float, threads: int) -> dict:
    idx = BundleIndex(bundle)
    q4 = idx.tiers.index(Tier.Q4_K) if Tier.Q4_K in idx.tiers else len(idx.tiers) // 2
    budget = int(idx.expert_bytes()[..., q4].sum() * share)
    ctl, llm = _ctl(bundle, "dymoe", threads, memory_budget=budget, lookahead=1)
    peak, samples, stop = [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            r = ctl.pager.resident_bytes()
            peak[0] = max(peak[0], r)
            samples[0] += 1
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    try:
        llm.reset()
        llm.eval(llm.tokenize(PROMPT.encode(), add_bos=True))
        th.start()
        t0 = time.perf_counter()
        for _ in range(tokens):
            llm.eval([llm.sample(temp=0.8, top_k=40)])
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        s = ctl.stats()
    finally:
        stop.set()
        ctl.close()
    return {"tokens": tokens, "budget_bytes": budget, "budget_share_of_q4k_experts": share,
            "max_resident_bytes": peak[0], "max_over_budget": round(peak[0] / budget, 4), "samples": samples[0],
            "lookahead_recall_next_layer": s.lookahead_recall, "recall_by_layer": s.lookahead_recall_by_layer,
            "hit_rate": s.hit_rate, "tier_changes": s.tier_changes, "bytes_read": s.bytes_read,
            "tpot_ms": round(dt / tokens * 1e3, 3),
            "callback_ms_per_token": round(s.callback_seconds / s.tokens * 1e3, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--tpot-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-share", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = {"tpot": tpot_table(args.bundle, args.tpot_tokens, args.rounds, args.threads),
           "budget": budget_run(args.bundle, args.tokens, args.budget_share, args.threads)}
    print(json.dumps(res, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
