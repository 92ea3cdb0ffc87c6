"""Convert throughput and peak RSS against ggml's quantizers alone, in one run.

    .venv/bin/python scripts/bench_convert.py [--layers 2] [--threads 2] [--json]

Writes a synthetic OLMoE-shaped checkpoint (d=2048, expert ff 1024, 64 experts, vocab 50304,
bfloat16), then
1. times ``dymoe-gguf convert`` (base Q4_K, tiers Q2_K,Q4_K,Q8_0) in a fresh subprocess and takes its
   peak RSS from the convert's own psutil samples (``--json``: ru_maxrss of a child forked from this
   process would count the parent's pages it inherited before exec);
2. times ggml's quantizers alone on the same work — every tensor quantized into the same types with
   the same thread count, from float32 arrays already in memory (no reading, no writing);
and prints both with their ratio. Targets (issue 2): convert ≤ 1.3× the quantizers alone; peak RSS
≤ 2× the largest tensor + 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dymoe_gguf._native import ggml
from dymoe_gguf.bundle.format import DEFAULT_TIERS, Tier
from dymoe_gguf.convert.plan import make_plan
from dymoe_gguf.converters import open_source
from dymoe_gguf.synth import SynthConfig, write_synthetic


def quantize_only(plan, threads: int) -> float:
    """Seconds ggml needs for the plan's quantization work alone (same types, same threads)."""
    side = {(f.tier, t.source.name): t.qtype for f in plan.files[1:] for t in f.tensors}
    jobs = []
    rng = np.random.default_rng(0)
    for bt in plan.base.tensors:
        if bt.source.is_expert:
            types = tuple(dict.fromkeys([bt.qtype, *(side[(tier, bt.name)] for tier in plan.tiers)]))
            one = rng.standard_normal(bt.shape[1:]).astype(np.float32)
            jobs += [(one, types)] * bt.shape[0]
        else:
            jobs.append((rng.standard_normal(bt.shape).astype(np.float32).reshape(-1, bt.shape[-1]), (bt.qtype,)))

    def run(job):
        x, types = job
        for q in types:
            ggml.quantize(x, q)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, jobs))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("DYMOE_BENCH_DIR")) as d:
        src = Path(d) / "src"
        cfg = SynthConfig(arch="olmoe", n_layer=args.layers, d=2048, ff=1024, n_expert=64, top_k=8, n_head=16,
                          vocab=50304, dtype="bfloat16", seed=0)
        write_synthetic(src, cfg)
        source = open_source(src)
        plan = make_plan(source, Tier.Q4_K, DEFAULT_TIERS)
        largest = max(t.n_elements * 4 // (t.shape[0] if t.is_expert else 1) for t in source.tensors)
        src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        del source
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "dymoe_gguf", "convert", str(src), "-o", str(Path(d) / "out"),
                              "--json", "-t", str(args.threads)], check=True, capture_output=True, text=True)
        convert_s = time.perf_counter() - t0
        peak = json.loads(out.stdout)["peak_rss"]
        written = sum(p.stat().st_size for p in (Path(d) / "out").iterdir())
        quant_s = quantize_only(plan, args.threads)
    res = {
        "source_bytes": src_bytes, "bundle_bytes": written, "threads": args.threads,
        "convert_s": round(convert_s, 2), "quantize_only_s": round(quant_s, 2),
        "ratio": round(convert_s / quant_s, 3), "throughput_MBps": round(src_bytes / convert_s / 1e6, 1),
        "peak_rss_MB": round(peak / 1e6, 1), "largest_tensor_f32_MB": round(largest / 1e6, 1),
        "rss_target_MB": round((2 * largest + 300e6) / 1e6, 1),
    }
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
