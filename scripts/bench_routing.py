"""Routing statistics of a bundle or of a synthetic model: what sets the bench's realistic routing.

    .venv/bin/python scripts/bench_routing.py BUNDLE [--text data/calibration.txt] [--chunks 8] [--json]
    .venv/bin/python scripts/bench_routing.py --synth realistic [--layers 3] [--d 2048] [--ff 1024] [--experts 64]
        [--top-k 8] [--skew S] [--residual-scale R] [--router-corr C] [--router-logit-std T] [--json]

Per MoE layer: normalised load entropy (and its share above the top-k floor, comparable across expert
counts), the hottest expert's share of selections, calibrate's transition predictability, and the
controller's next-layer look-ahead recall (:func:`dymoe_gguf.bench.routing.routing_stats`). With
``--synth`` a synthetic OLMoE-shape checkpoint is generated with the preset's knobs (``realistic`` or
``random``, any knob overridden), converted (Q8_0 experts: fast) into a temporary directory, measured
and deleted. The bench's realistic preset (``dymoe_gguf.synth.REALISTIC``) was chosen this way against
the trained model: ``scripts/bench_routing.py build/tiny.dymoe --text data/heldout.txt --chunks 16``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from dymoe_gguf.bench.routing import routing_stats
from dymoe_gguf.synth import RANDOM, REALISTIC, SynthConfig, write_checkpoint


def synthetic(args: argparse.Namespace, tmp: Path) -> Path:
    from dymoe_gguf.bundle.format import Tier
    from dymoe_gguf.convert import convert

    knobs = dict(REALISTIC if args.synth == "realistic" else RANDOM)
    for k in knobs:
        if getattr(args, k) is not None:
            knobs[k] = getattr(args, k)
    c = SynthConfig(arch="olmoe", n_layer=args.layers, d=args.d, ff=args.ff, n_expert=args.experts, top_k=args.top_k,
                    n_head=max(1, args.d // 128), vocab=4096, dtype="float16", **knobs)
    write_checkpoint(tmp / "hf", c, progress=True)
    convert(tmp / "hf", tmp / "synth.dymoe", base_tier=Tier.Q8_0, tiers=(Tier.Q8_0,), threads=args.threads,
            progress=True)
    shutil.rmtree(tmp / "hf")
    return tmp / "synth.dymoe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--text", type=Path, default=Path("data/calibration.txt"))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--synth", choices=["realistic", "random"], default=None)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    for k in REALISTIC:
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=float, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if (args.bundle is None) == (args.synth is None):
        ap.error("give a BUNDLE or --synth, not both")
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    try:
        bundle = args.bundle or synthetic(args, tmp)
        res = routing_stats(bundle, args.text, chunks=args.chunks, threads=args.threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
