"""Compare the logits files written by tests/native/c/forward.c (two builds, the same model and text).

    python tests/native/fwd_compare.py A.bin B.bin [--json]

Prints (or returns, from :func:`compare`) the largest absolute logit difference, that difference
relative to the largest |logit|, the largest per-position KL divergence between the two softmax
distributions, and the share of positions whose most likely token agrees. Token ids must be equal.
"""

from __future__ import annotations

import argparse
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MAGIC = b"DYMFWD01"


@dataclass(frozen=True)
class Forward:
    """One forward.c output."""

    n_vocab: int
    n_prompt: int
    n_decode: int
    page_size: int
    n_views: int
    tokens: np.ndarray   # int32 [n_prompt + n_decode]
    logits: np.ndarray   # float32 [n_prompt + n_decode, n_vocab]


def load(path: str | Path) -> Forward:
    """Read a forward.c output file."""
    data = Path(path).read_bytes()
    if data[:8] != MAGIC:
        raise ValueError(f"{path}: not a forward.c output")
    n_vocab, n_prompt, n_decode, page, views = struct.unpack_from("<5i", data, 8)
    n = n_prompt + n_decode
    off = 8 + 20
    tokens = np.frombuffer(data, dtype="<i4", count=n, offset=off)
    logits = np.frombuffer(data, dtype="<f4", count=n * n_vocab, offset=off + 4 * n).reshape(n, n_vocab)
    return Forward(n_vocab, n_prompt, n_decode, page, views, tokens, logits)


@dataclass(frozen=True)
class Diff:
    """How far two forward passes are apart."""

    max_abs: float       # largest |logit_a - logit_b|
    max_rel: float       # max_abs / largest |logit_a|
    max_kl: float        # largest KL(softmax a || softmax b) over positions
    top1_agree: float    # share of positions with the same most likely token
    positions: int


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare(a: Forward, b: Forward) -> Diff:
    """The difference between two forward passes of the same tokens."""
    if a.logits.shape != b.logits.shape or not np.array_equal(a.tokens, b.tokens):
        raise ValueError("the two runs did not see the same tokens")
    d = np.abs(a.logits.astype(np.float64) - b.logits.astype(np.float64))
    la, lb = _log_softmax(a.logits), _log_softmax(b.logits)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return Diff(max_abs=float(d.max()), max_rel=float(d.max() / np.abs(a.logits).max()), max_kl=float(kl.max()),
                top1_agree=float((a.logits.argmax(-1) == b.logits.argmax(-1)).mean()), positions=len(a.tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    diff = compare(load(args.a), load(args.b))
    if args.json:
        print(json.dumps(asdict(diff)))
    else:
        print(f"max |dlogit| {diff.max_abs:.3g} ({diff.max_rel:.3g} of max |logit|), max KL {diff.max_kl:.3g}, "
              f"top-1 agreement {100 * diff.top1_agree:.2f}% over {diff.positions} positions")


if __name__ == "__main__":
    main()
