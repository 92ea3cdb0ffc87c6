"""Targets of the patch issue, in one run on one bundle (needs the patched llama.cpp).

    .venv/bin/python scripts/bench_views.py BUNDLE --text data/heldout.txt [--json]

1. Speed: TPOT (median per-token time, :func:`dymoe_gguf.bench.timing.decode_times`, rounds interleaved, model
   resident) of every layer read through
   per-expert views — all experts at Q4_K, and a mix (half Q2_K, half Q8_0) — against the same layers
   swapped whole to a uniform Q4_K tensor (per-layer view). Target: mixed views within 3% of uniform.
2. Quality at equal resident bytes: for budgets of 30–70% of the bundle's Q4_K expert bytes, KL and
   top-1 against the full-precision reference of the static (calibration-profile) allocation in
   per-expert mode against per-layer mode. Needs a calibration profile and a reference (the bundle's
   base when full precision, or --reference).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from dymoe_gguf import Controller
from dymoe_gguf.bench.timing import decode_times, eval_prompt
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.quality.eval import evaluate


def tpot(bundle: Path, tiers: np.ndarray | None, mode: str, n: int, threads: int) -> list[float]:
    """Per-token decode times (s) of ``n`` greedy tokens, after 8 untimed warm-up steps."""
    policy = "manual" if tiers is not None else "uniform:Q4_K"
    with Controller.open(bundle, policy=policy, mode=mode, lookahead=0) as ctl:
        llm = ctl.llama(n_ctx=512, n_threads=threads)
        if tiers is not None:
            ctl.set_tiers(tiers)
        first = eval_prompt(llm, llm.tokenize(b"The history of the city", add_bos=True))
        return decode_times(llm, n, first=first, warmup=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    idx = BundleIndex(args.bundle)
    L, E = len(idx.moe_layers), idx.n_expert
    q4 = idx.tiers.index(Tier.Q4_K)
    mixed = np.tile(np.array([0, len(idx.tiers) - 1], dtype=np.int16), (L, E // 2 + 1))[:, :E]
    cases = {"uniform Q4_K tensor (per-layer)": (None, "per-layer"),
             "per-expert views, all Q4_K": (np.full((L, E), q4, dtype=np.int16), "per-expert"),
             "per-expert views, Q2_K/Q8_0 mix": (mixed, "per-expert")}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, (tiers, mode) in cases.items():
            samples[name] += tpot(args.bundle, tiers, mode, args.tokens, args.threads)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ref = med["uniform Q4_K tensor (per-layer)"]
    speed = {k: {"tpot_ms": round(v * 1e3, 3), "ratio": round(v / ref, 4)} for k, v in med.items()}
    q4_bytes = int(idx.expert_bytes()[..., q4].sum())
    quality = []
    for share in (0.3, 0.5, 0.7):
        row = {"budget_share_of_q4k": share, "budget_bytes": int(q4_bytes * share)}
        for mode in ("per-layer", "per-expert"):
            r = evaluate(args.bundle, args.text, reference=args.reference, ctx=args.ctx, max_chunks=args.chunks,
                         policy="static", mode=mode, memory_budget=int(q4_bytes * share), lookahead=0)
            row[mode] = {"kl": r.kl_mean, "top1": r.top1, "ppl": r.ppl}
        quality.append(row)
    print(json.dumps({"speed": speed, "quality": quality}, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
