"""Look-ahead recall on the C hot path against the Python one, same bundle, same tokens.

    .venv/bin/python docs/bench/lookahead_paths.py BUNDLE [--chunks 2] [--decode 64]

For each path: the chunks of ``data/calibration.txt`` (256 tokens) evaluated as batches, then the first
``--decode`` tokens of each chunk as one-token decodes; prints ``stats().lookahead_recall`` and its
per-layer values (policy dymoe, look-ahead 1, ``lookahead_min_recall`` 0, no budget).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dymoe_gguf._native.llama import open_llama
from dymoe_gguf.bundle.format import BASE_FILE
from dymoe_gguf.quality.eval import tokenize_chunks
from dymoe_gguf.runtime.controller import Controller

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    a = ap.parse_args()
    llm = open_llama(a.bundle / BASE_FILE, vocab_only=True, n_ctx=256)
    toks = tokenize_chunks(llm, (ROOT / "data" / "calibration.txt").read_text(encoding="utf-8"), 256, a.chunks)
    llm.close()
    for hot_path in ("auto", "python"):
        for batch in (True, False):
            with Controller.open(a.bundle, policy="dymoe", lookahead=1, lookahead_min_recall=0.0,
                                 hot_path=hot_path) as ctl:
                llm = ctl.llama(n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, n_threads=2)
                for chunk in toks:
                    llm.reset()
                    if batch:
                        llm.eval(chunk)
                    else:
                        for t in chunk[: a.decode]:
                            llm.eval([t])
                s = ctl.stats()
            print(f"hot_path={hot_path:6s} ({s.hot_path}) {'batches' if batch else 'one-token decodes'}: "
                  f"recall {s.lookahead_recall} by layer {s.lookahead_recall_by_layer}")


if __name__ == "__main__":
    main()
