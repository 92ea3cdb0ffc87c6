"""Is the bench's tuned stock the best stock llama.cpp can do under the cap? An independent measurement.

    .venv/bin/python scripts/bench_stock.py MODEL.gguf --cap 242MiB [--tokens 64] [--threads 2] [--lib DIR]
        [--rounds 4] [--json]

Runs, alternately (ABBA order) and each in its own capped cgroup from a cold page cache (``--rounds`` times):

* ``independent``: a standalone program on llama.cpp's C API only (llama_cpp's ctypes bindings, none of
  dymoe-gguf): ``use_extra_bufts = false`` (repack off), ``LLAMA_LOAD_MODE_MMAP``, and right after
  ``llama_model_load_from_file`` ``madvise(MADV_RANDOM)`` on every mapping of the file (from
  /proc/self/maps); the same 32-token prompt and 64-token feed as the bench (numpy seed 0); per step
  ``llama_decode`` of one token + argmax of its logits. ``--lib DIR`` loads another build's libraries
  (``LLAMA_CPP_LIB_PATH``, e.g. a stock wheel's ``llama_cpp/lib``); default: this venv's build, whose
  patch features are off unless asked for (``DYMOE_NO_POPULATE`` is removed from the environment);
* ``bench``: the bench's own ``stock-q4k-tuned`` worker on the same file and cap.

Prints the median TPOT (and bytes read per token, major faults per token) of each and their ratio.
Also reported: whether llama.cpp's own ``lazy_mode`` could help stock here (it marks only per-layer token
embeddings, so not on MoE experts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from dymoe_gguf.bench.cgroup import MemoryCap
from dymoe_gguf.bench.configs import CONFIGS, BenchOptions, worker_cfg
from dymoe_gguf.bench.runner import run_worker
from dymoe_gguf.util import parse_size

# The independent program: llama.cpp's C API through llama_cpp's ctypes bindings, libc's madvise.
PROGRAM = r"""
import ctypes, json, os, resource, statistics, sys, time
import numpy as np
from llama_cpp import llama_cpp as L
path, n_prompt, n_tok, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
def io():
    for line in open('/proc/self/io'):
        if line.startswith('read_bytes:'):
            return int(line.split()[1])
fd = os.open(path, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
L.llama_backend_init()
t0, b0 = time.perf_counter(), io()
mp = L.llama_model_default_params()
mp.use_extra_bufts = False
mp.load_mode = L.LLAMA_LOAD_MODE_MMAP
model = L.llama_model_load_from_file(path.encode(), mp)
real = os.path.realpath(path)
for line in open('/proc/self/maps'):
    f = line.split(None, 5)
    if len(f) == 6 and f[5].strip() == real:
        a, b = (int(x, 16) for x in f[0].split('-'))
        if libc.madvise(a, b - a, 1):  # MADV_RANDOM
            raise OSError(ctypes.get_errno(), 'madvise')
cp = L.llama_context_default_params()
cp.n_ctx = cp.n_batch = max(128, n_prompt + n_tok + 16)
cp.n_threads = cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)
vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
rng = np.random.default_rng(0)
prompt = rng.integers(0, vocab, n_prompt).tolist()
feed = rng.integers(0, vocab, n_tok).tolist()
def decode(toks):
    arr = (L.llama_token * len(toks))(*toks)
    if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(toks))) != 0:
        raise RuntimeError('llama_decode failed')
    return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,))))
decode(prompt)
ttft = time.perf_counter() - t0
b1, f1 = io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
steps = []
for tok in feed:
    t = time.perf_counter(); decode([tok]); steps.append(time.perf_counter() - t)
n = len(steps)
anon = next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('RssAnon:'))
print(json.dumps({'ok': True, 'tpot_s': statistics.median(steps), 'ttft_s': ttft, 'rssanon': anon,
                  'bytes_per_token': (io() - b1) / n,
                  'major_faults_per_token': (resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f1) / n}))
L.llama_free(ctx); L.llama_model_free(model)
"""


def independent(model: Path, cap: int, tokens: int, threads: int, lib: Path | None) -> dict:
    env = dict(os.environ)
    env.pop("DYMOE_NO_POPULATE", None)
    if lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
    with MemoryCap.create(cap) as cg:
        out = subprocess.run([sys.executable, "-c", PROGRAM, str(model), "32", str(tokens), str(threads)], env=env,
                             capture_output=True, text=True, preexec_fn=cg.join_self, timeout=1800)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
    return json.loads(line) if line else {"ok": False, "error": out.stderr.strip()[-400:], "rc": out.returncode}


def bench_tuned(model: Path, cap: int, tokens: int, threads: int) -> dict:
    bundle = model.parent
    cfg = worker_cfg("stock-q4k-tuned", CONFIGS["stock-q4k-tuned"], {"q4k": bundle}, None,
                     BenchOptions(tokens=tokens), threads)
    return run_worker(cfg, cap, 1800)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a bundle's model.gguf (uniform Q4_K experts)")
    ap.add_argument("--cap", required=True, help="memory cap, e.g. 242MiB")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--lib", type=Path, default=None, help="llama_cpp/lib of another build (e.g. a stock wheel)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cap = parse_size(args.cap)
    runs: dict[str, list[dict]] = {"independent": [], "bench": []}
    for i in range(args.rounds):  # ABBA order: a load that drifts during the run favours neither
        order = ("independent", "bench") if i % 2 == 0 else ("bench", "independent")
        for k in order:
            runs[k].append(independent(args.model, cap, args.tokens, args.threads, args.lib) if k == "independent"
                           else bench_tuned(args.model, cap, args.tokens, args.threads))
    summary = {}
    for k, rs in runs.items():
        ok = [r for r in rs if r.get("ok")]
        summary[k] = {"tpot_ms": [round(1000 * r["tpot_s"], 1) for r in ok],
                      "median_tpot_ms": round(1000 * statistics.median(r["tpot_s"] for r in ok), 1) if ok else None,
                      "mib_per_token": [round(r["bytes_per_token"] / 2**20, 1) for r in ok],
                      "faults_per_token": [round(r["major_faults_per_token"]) for r in ok],
                      "rss_anon_mib": [round(r.get("rssanon", 0) / 2**20, 1) for r in ok],
                      "errors": [r.get("error") for r in rs if not r.get("ok")]}
    a, b = summary["independent"]["median_tpot_ms"], summary["bench"]["median_tpot_ms"]
    summary["bench_over_independent"] = round(b / a, 3) if a and b else None
    summary |= {"model": str(args.model), "cap_bytes": cap, "threads": args.threads, "lib": str(args.lib or "venv")}
    print(json.dumps(summary, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
