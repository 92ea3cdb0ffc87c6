"""What per-tensor checksums cost: the hash candidates, conversion, plain inspect and inspect --verify.

    .venv/bin/python scripts/bench_checksum.py [--layers 1] [--repeat 5] [--json]

1. Throughput of each candidate hash on one 512 MiB in-memory buffer, hashed 64 MiB at a time
   (median of ``--repeat``): xxh3_64 and xxh3_128 (xxhash), sha256 and blake2b (hashlib), blake3 when
   installed.
2. A synthetic OLMoE-shaped checkpoint (d=2048, expert ff 1024, 64 experts, vocab 50304, bf16) is
   converted once (base Q4_K, tiers Q2_K,Q4_K,Q8_0); the share of that time the checksums take is
   the bundle's bytes hashed with xxh3_64 in this process, over the conversion's time.
3. ``inspect`` (headers only) against ``inspect --verify`` (every tensor hashed), warm page cache and
   cold (``posix_fadvise(DONTNEED)`` on every file first), medians of ``--repeat`` runs in this process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hash_throughput(repeat: int) -> dict[str, float]:
    buf = memoryview(np.random.default_rng(0).integers(0, 256, 512 * 2**20, dtype=np.uint8))
    chunks = [buf[o:o + 64 * 2**20] for o in range(0, len(buf), 64 * 2**20)]
    algos = {"xxh3_64": lambda b: xxhash.xxh3_64(b).intdigest(), "xxh3_128": lambda b: xxhash.xxh3_128(b).intdigest(),
             "sha256": lambda b: hashlib.sha256(b).digest(), "blake2b": lambda b: hashlib.blake2b(b).digest()}
    try:
        import blake3

        algos["blake3"] = lambda b: blake3.blake3(b).digest()
    except ImportError:
        pass
    return {name: len(buf) / median_seconds(lambda f=f: [f(c) for c in chunks], repeat) / 1e9
            for name, f in algos.items()}


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from dymoe_gguf.bundle import BundleIndex
    from dymoe_gguf.bundle.format import DEFAULT_TIERS, Tier
    from dymoe_gguf.bundle.inspect import inspect_bundle
    from dymoe_gguf.convert import convert
    from dymoe_gguf.synth import SynthConfig, write_synthetic

    res: dict = {"hash_gb_per_s": hash_throughput(args.repeat)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        src = write_synthetic(Path(d) / "src", SynthConfig(arch="olmoe", n_layer=args.layers, d=2048, ff=1024,
                                                             n_expert=64, top_k=8, n_head=16, n_head_kv=16,
                                                             vocab=50304, dtype="bfloat16"))
        out = Path(d) / "b.dymoe"
        t0 = time.perf_counter()
        convert(src, out, base_tier=Tier.Q4_K, tiers=DEFAULT_TIERS, threads=os.cpu_count() or 1)
        convert_s = time.perf_counter() - t0
        files = sorted(out.glob("*.gguf"))
        data = [np.fromfile(p, dtype=np.uint8) for p in files]
        hash_s = median_seconds(lambda: [xxhash.xxh3_64(a).intdigest() for a in data], args.repeat)  # noqa: B023
        size = sum(a.nbytes for a in data)
        data.clear()
        BundleIndex(out)
        plain = median_seconds(lambda: inspect_bundle(out), args.repeat)
        verify_warm = median_seconds(lambda: inspect_bundle(out, verify=True), args.repeat)
        cold = []
        for _ in range(args.repeat):
            drop_cache(files)
            t0 = time.perf_counter()
            inspect_bundle(out, verify=True)
            cold.append(time.perf_counter() - t0)
        res |= {"bundle_bytes": size, "convert_s": round(convert_s, 2), "hash_all_s": round(hash_s, 3),
                "hash_share_of_convert": round(hash_s / convert_s, 5), "inspect_s": round(plain, 3),
                "inspect_verify_warm_s": round(verify_warm, 3),
                "inspect_verify_cold_s": round(statistics.median(cold), 3),
                "verify_warm_over_inspect": round(verify_warm / plain, 1)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
