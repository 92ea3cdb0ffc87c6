"""Compare the logits files written by tests/native/c/forward.c (two builds, the same model and text).

    python tests/native/fwd_compare.py A.bin B.bin [--json]
    python tests/native/fwd_compare.py --verdict DIR --builds "x86-native x86-scalar aarch64-a76" \
        --threads "1 2" [--page16k LABEL] [--tolerance-from x86-scalar]     (scripts/test_aarch64.sh)

Prints (or returns, from :func:`compare`) the largest absolute logit difference, that difference
relative to the largest |logit|, the largest per-position KL divergence between the two softmax
distributions, and the share of positions whose most likely token agrees. Token ids must be equal.

``--verdict`` reads DIR/<build>.t<threads>.<mode>.bin (modes: plain, mixed = per-expert views mixing
Q2_K/Q4_K/Q8_0, q4k = every expert viewed at the base tier, hook = mixed with patch 0003's C hot path
hooked on every MoE layer) and checks: within each build, every thread count gives the same bits, q4k
gives plain's bits and hook gives mixed's bits; across builds, each aarch64 build differs from
x86-native by at most TOLERANCE_FACTOR x what the --tolerance-from x86 build differs from it (max
|dlogit| and max KL: the size of a legitimate float-rounding difference, measured on the same source
with other SIMD code); the other x86 builds give information lines. x86-scalar (ggml's generic C
kernels, no bit in common with x86-native at any position here) is the reference test_aarch64.sh
uses; x86-avx2 shares most kernels with x86-native (same bits at most positions), so it measures one
or two kernels rather than a change of SIMD code. With --page16k, that run reports 16 KiB pages and
gives the bits of the same build at 4 KiB.
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


# An aarch64 build may differ from x86-native by at most this many times what x86-avx2 differs from it.
TOLERANCE_FACTOR = 2.0
MODES = ("plain", "mixed", "q4k", "hook")


def _same_bits(a: Forward, b: Forward) -> bool:
    return np.array_equal(a.logits.view(np.uint32), b.logits.view(np.uint32)) and np.array_equal(a.tokens, b.tokens)


def _same_rows(a: Forward, b: Forward) -> int:
    return int((a.logits.view(np.uint32) == b.logits.view(np.uint32)).all(-1).sum())


def verdict(out: Path, builds: list[str], threads: list[str], page16k: str | None = None,
            tolerance_from: str = "x86-avx2") -> int:
    """Print one PASS/FAIL line per check (see the module docstring); the number of failures."""
    runs = {(b, t, m): load(out / f"{b}.t{t}.{m}.bin") for b in builds for t in threads for m in MODES}
    fails = 0

    def report(ok: bool, text: str) -> None:
        nonlocal fails
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {text}")

    t_max = threads[-1]
    for b in builds:
        same_t = all(_same_bits(runs[b, threads[0], m], runs[b, t, m]) for t in threads for m in MODES)
        report(same_t, f"{b}: threads {' and '.join(threads)} give the same bits ({', '.join(MODES)})")
        q4k = all(_same_bits(runs[b, t, "plain"], runs[b, t, "q4k"]) for t in threads)
        report(q4k, f"{b}: every expert viewed at Q4_K (the base tier, from the sidecar) = plain, bit for bit")
        hook = all(_same_bits(runs[b, t, "mixed"], runs[b, t, "hook"]) for t in threads)
        report(hook, f"{b}: mixed with the C hot path (patch 0003) hooked on every MoE layer = mixed, bit for bit")
        mixed = runs[b, t_max, "mixed"]
        d = compare(runs[b, t_max, "plain"], mixed)
        report(mixed.n_views > 0 and d.max_abs > 0,
               f"{b}: mixed tiers ({mixed.n_views} expert views) change the logits (top-1 agreement with plain "
               f"{100 * d.top1_agree:.1f}%)")
    ref = "x86-native"
    for r in [r for r in builds if r.startswith("x86-") and r != ref]:
        decides = r == tolerance_from
        for m in ("plain", "mixed"):
            base = compare(runs[ref, t_max, m], runs[r, t_max, m])
            tol, kl_tol = TOLERANCE_FACTOR * base.max_abs, TOLERANCE_FACTOR * max(base.max_kl, 1e-12)
            print(f"      {m}: {r} vs {ref}: max |dlogit| {base.max_abs:.3g} ({base.max_rel:.2g} of max |logit|), "
                  f"max KL {base.max_kl:.2g}, top-1 {100 * base.top1_agree:.2f}%, same bits at "
                  f"{_same_rows(runs[ref, t_max, m], runs[r, t_max, m])} of {base.positions} positions "
                  f"-> tolerance {tol:.3g}, KL {kl_tol:.2g}{'' if decides else ' (not the verdict)'}")
            for b in builds:
                if not b.startswith("aarch64"):
                    continue
                d = compare(runs[ref, t_max, m], runs[b, t_max, m])
                ok = d.max_abs <= tol and d.max_kl <= kl_tol
                text = (f"{b} vs {ref}, {m}: max |dlogit| {d.max_abs:.3g} (tolerance {tol:.3g}: 2x {r}), max KL "
                        f"{d.max_kl:.2g} (tolerance {kl_tol:.2g}), top-1 {100 * d.top1_agree:.2f}%, same bits at "
                        f"{_same_rows(runs[ref, t_max, m], runs[b, t_max, m])} positions")
                if decides:
                    report(ok, text)
                else:
                    print(f"{'info' if ok else 'INFO'}  {text}: {'within' if ok else 'outside'}")
    if page16k:
        b = page16k.rsplit(".t", 1)[0].replace("-p16k", "")
        for m in MODES:
            r16 = load(out / f"{page16k}.{m}.bin")
            r4 = runs[b, page16k.rsplit(".t", 1)[1], m]
            report(r16.page_size == 16384 and _same_bits(r16, r4),
                   f"{b} with 16 KiB pages (page size seen: {r16.page_size}), {m}: the bits of 4 KiB pages")
    return fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, nargs="?")
    ap.add_argument("b", type=Path, nargs="?")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verdict", type=Path, metavar="DIR")
    ap.add_argument("--builds", default="x86-native x86-avx2 aarch64-a76 aarch64-armv8.2")
    ap.add_argument("--threads", default="1 2")
    ap.add_argument("--page16k")
    ap.add_argument("--tolerance-from", default="x86-avx2", metavar="BUILD",
                    help="the x86 build whose difference from x86-native sets the tolerance (others: info)")
    args = ap.parse_args()
    if args.verdict:
        raise SystemExit(1 if verdict(args.verdict, args.builds.split(), args.threads.split(), args.page16k,
                                       args.tolerance_from) else 0)
    if args.a is None or args.b is None:
        ap.error("two files, or --verdict DIR")
    diff = compare(load(args.a), load(args.b))
    if args.json:
        print(json.dumps(asdict(diff)))
    else:
        print(f"max |dlogit| {diff.max_abs:.3g} ({diff.max_rel:.3g} of max |logit|), max KL {diff.max_kl:.3g}, "
              f"top-1 agreement {100 * diff.top1_agree:.2f}% over {diff.positions} positions")


if __name__ == "__main__":
    main()
