"""The hot path's cost per MoE layer per token: C (patches/0003) against Python, same bundle and budget.

    .venv/bin/python docs/bench/hotpath.py BUNDLE[@CAP] ... [--rounds 2] [--budget 2MiB]

Each configuration is one ``bench`` worker (own process, cold cache, in a memory cgroup of CAP when
given, e.g. ``@242MiB``; the budget is then the bench's: CAP - non-expert weights - 64 MiB); rounds
alternate the order (ABC, CBA). Prints TPOT, the hot path's seconds per MoE layer per token without
its demand reads (``callback_s_per_layer_token``) and the callback's share of decode time, medians.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from dymoe_gguf.bench.models import model_files
from dymoe_gguf.bench.run import expert_budget
from dymoe_gguf.bench.runner import run_worker
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.util import parse_size

VARIANTS = [("per-expert, C hot path", {"mode": "per-expert"}),
            ("per-expert, Python hot path", {"mode": "per-expert", "options": {"hot_path": "python"}}),
            ("per-layer (Python)", {"mode": "per-layer"})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", default="2MiB", help="expert budget where no cap is given")
    a = ap.parse_args()
    rows: dict[tuple[str, str], list[dict]] = {}
    for spec in a.bundles:
        path, _, cap_s = spec.partition("@")
        b, cap = Path(path), parse_size(cap_s) if cap_s else None
        budget = expert_budget(cap, b) if cap else parse_size(a.budget)
        name = f"{b.parent.name}/{b.name} ({len(BundleIndex(b).moe_layers)} MoE layers)"
        for r in range(a.rounds):
            for label, kw in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                cfg = {"name": label, "kind": "dymoe", "model": str(b), "tokens": 64, "prompt_tokens": 32,
                       "threads": 2, "n_ctx": 128, "seed": 0, "lookahead": 1, "budget": budget,
                       "files": [str(f) for f in model_files(b, stock=False)]} | kw
                res = run_worker(cfg, cap, 600)
                rows.setdefault((name, label), []).append(res)
                print(name, label, r, res.get("ok") or res.get("error"), res.get("tpot_s"),
                      res.get("callback_s_per_layer_token"), flush=True)
    print("| bundle | configuration | hot path | TPOT ms | hot path µs / layer / token | callback share | runs |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (name, label), rs in rows.items():
        ok = [r for r in rs if r.get("ok")]
        if not ok:
            print(f"| {name} | {label} | failed: {rs[0].get('error')} | | | | 0 |")
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("tpot_s", "callback_s_per_layer_token",
                                                                 "callback_share")}
        print(f"| {name} | {label} | {ok[0]['controller']['hot_path']} | {1000 * med['tpot_s']:.1f} | "
              f"{1e6 * med['callback_s_per_layer_token']:.0f} | {med['callback_share']:.2%} | {len(ok)} |")


if __name__ == "__main__":
    main()
