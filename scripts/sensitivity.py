"""Per-expert sensitivity against recorded importance (issue 3's calibration report).

    .venv/bin/python scripts/sensitivity.py BUNDLE --text data/heldout.txt [--ctx 256] [--chunks 8]

BUNDLE must have a full-precision base (convert with --base-tier F32 or F16: it is the reference)
and a calibration profile (dymoe-gguf calibrate). For every (MoE layer, expert), only that expert is
switched to the lowest tier (per-expert views: needs the patched llama.cpp) and the KL divergence
against the full-precision model is measured on the text. Prints per-layer Spearman rank correlations
between that sensitivity and the recorded selection frequency and gate mass, and the overall ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.quality.eval import evaluate
from dymoe_gguf.quality.profile import load_profile


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (average ranks not needed: ties are rare in these measurements)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    idx = BundleIndex(args.bundle)
    prof = load_profile(idx)
    if prof is None or not idx.base_tier.is_full_precision:
        raise SystemExit("error: needs a full-precision base and a calibration profile (run dymoe-gguf calibrate)")
    low = idx.tiers[0].name
    kl = np.zeros((len(idx.moe_layers), idx.n_expert))
    for i, layer in enumerate(idx.moe_layers):
        for e in range(idx.n_expert):
            r = evaluate(args.bundle, args.text, ctx=args.ctx, max_chunks=args.chunks, policy="manual",
                         mode="per-expert", lookahead=0, tiers={(layer, e): low})
            kl[i, e] = r.kl_mean
    freq, mass = prof.freq[list(idx.moe_layers)], prof.mass[list(idx.moe_layers)]
    res = {
        "tier": low, "kl": kl.round(6).tolist(),
        "spearman_freq_by_layer": [spearman(kl[i], freq[i]) for i in range(len(kl))],
        "spearman_mass_by_layer": [spearman(kl[i], mass[i]) for i in range(len(kl))],
        "spearman_freq_all": spearman(kl.ravel(), freq.ravel()),
        "spearman_mass_all": spearman(kl.ravel(), mass.ravel()),
    }
    print(json.dumps(res, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
