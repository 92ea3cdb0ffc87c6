"""llama-perplexity's per-token scores and summary statistics, reproduced in numpy.

Source: ``tools/perplexity/perplexity.cpp`` of the llama.cpp vendored in llama-cpp-python 0.3.36.

* Perplexity (``perplexity()``): per scored position, ``nll = log Σ exp(l - max) + max - l[target]``
  with the exponentials summed in double; PPL = exp(mean nll), its uncertainty
  ``PPL · sqrt((mean nll² - mean nll²) / (n - 1))``.
* KL divergence (``kl_divergence()``): the reference's log-probabilities are stored as llama-perplexity
  stores them in its ``--kl-divergence-base`` file, 16 bits per token per position (range: the
  largest log-probability down to 16 below it), and tokens whose stored reference log-probability is
  not above -16 are left out of the sum. "Same top p" is the share of positions where the evaluated
  model's first most likely token is the stored reference's first most likely token; Δp is the
  evaluated model's probability of the actual next token minus the reference's. Percentiles
  interpolate linearly between sorted float32 values; the median of an even count averages the two
  middle values. Uncertainties are llama-perplexity's ``mean_and_uncertainty`` (0 below 11 values).

The float32/float64 split follows the C code (float32 logits and per-token terms, double sums), so
results agree with the tool to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_F32 = np.float32


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` per row of float32 ``logits`` [n, vocab] (float64)."""
    lg = np.asarray(logits, dtype=_F32)
    rows = np.arange(len(lg))
    mx = lg.max(-1)
    sum_exp = np.exp(lg - mx[:, None]).sum(-1, dtype=np.float64)
    return -((lg[rows, targets] - mx).astype(np.float64) - np.log(sum_exp))


@dataclass(frozen=True)
class StoredLogProbs:
    """Reference log-probabilities as llama-perplexity stores them: ``scale * q + min_log_prob``."""

    scale: np.ndarray         # float32 [n]
    min_log_prob: np.ndarray  # float32 [n]
    q: np.ndarray             # uint16 [n, vocab]

    def values(self) -> np.ndarray:
        """The stored log-probabilities, float32 [n, vocab]."""
        return self.scale[:, None] * self.q.astype(_F32) + self.min_log_prob[:, None]


def store_log_probs(logits: np.ndarray) -> StoredLogProbs:
    """Quantize a reference's float32 ``logits`` [n, vocab] as ``--kl-divergence-base`` does."""
    lg = np.asarray(logits, dtype=_F32)
    mx = lg.max(-1)
    mn = np.maximum(lg.min(-1), mx - _F32(16))
    log_sum_exp = np.log(np.exp(lg - mx[:, None]).sum(-1, dtype=np.float64)).astype(_F32)
    min_log_prob = (mn - mx - log_sum_exp).astype(_F32)
    scale = ((mx - mn) / _F32(65535)).astype(_F32)
    inv = np.where(scale != 0, _F32(1) / np.where(scale != 0, scale, _F32(1)), _F32(0)).astype(_F32)
    r = np.rint(inv[:, None] * (lg - mn[:, None]))  # nearest_int(): round half to even in float32
    q = np.where(lg > mn[:, None], r, 0).astype(np.int64).astype(np.uint16)  # wraps as the C cast does
    return StoredLogProbs(scale, min_log_prob, q)


@dataclass(frozen=True)
class KLScores:
    """Per scored position: the evaluated model against a stored reference."""

    nll: np.ndarray        # float32, evaluated model
    nll_base: np.ndarray   # float32, stored reference
    kld: np.ndarray        # float32
    p_diff: np.ndarray     # float32
    same_top: np.ndarray   # bool


def kl_scores(logits: np.ndarray, base: StoredLogProbs, targets: np.ndarray) -> KLScores:
    """``log_softmax(..., kld)`` of perplexity.cpp for every row of float32 ``logits`` [n, vocab]."""
    lg = np.asarray(logits, dtype=_F32)
    rows = np.arange(len(lg))
    imax = lg.argmax(-1)
    mx = lg[rows, imax]
    log_sum_exp = np.log(np.exp(lg - mx[:, None]).sum(-1, dtype=np.float64)).astype(_F32)
    full = (mx + log_sum_exp).astype(_F32)
    tok_nll = (full - lg[rows, targets]).astype(_F32)
    plb = base.values()
    nll_base = (-plb[rows, targets]).astype(_F32)
    terms = np.where(plb > _F32(-16), np.exp(plb) * (plb - lg + full[:, None]), _F32(0))
    kld = terms.sum(-1, dtype=np.float64).astype(_F32)
    p_diff = (np.exp(-tok_nll) - np.exp(-nll_base)).astype(_F32)
    return KLScores(tok_nll, nll_base, kld, p_diff, imax == plb.argmax(-1))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama-perplexity computes them (0 for 10 values or fewer)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 1:
        return 0.0, 0.0
    f = float(v.sum() / n)
    var = float((v * v).sum() / n - f * f)
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's ``percentile``: linear interpolation between sorted float32 values."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = _F32(fraction) * _F32(len(v) - 1)
    ip = int(p)
    p = _F32(p - ip)
    return float((_F32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v, n = sorted_values, len(sorted_values)
    return float(_F32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


@dataclass
class Accumulator:
    """Collects scores chunk by chunk; :meth:`summary` gives llama-perplexity's final numbers."""

    nll: list[np.ndarray] = field(default_factory=list)
    kl: list[KLScores] = field(default_factory=list)

    def add(self, nll_values: np.ndarray, kl: KLScores | None = None) -> None:
        self.nll.append(np.asarray(nll_values, dtype=np.float64))
        if kl is not None:
            self.kl.append(kl)

    @property
    def count(self) -> int:
        return int(sum(len(x) for x in self.nll))

    def summary(self) -> dict[str, float | None]:
        """ppl (± unc) and, with a reference, KL / same-top / Δp statistics; None where not measured."""
        m, unc = mean_and_uncertainty(np.concatenate(self.nll))
        ppl = math.exp(m)
        out: dict[str, float | None] = {"ppl": ppl, "ppl_unc": ppl * unc}
        keys = ("ppl_base", "ppl_ratio", "kl_mean", "kl_unc", "kl_median", "kl_p90", "kl_p95", "kl_p99", "kl_p999",
                "kl_max", "top1", "top1_unc", "dp_mean", "dp_mean_unc", "dp_rms")
        out.update(dict.fromkeys(keys))
        if not self.kl:
            return out
        cat = {f: np.concatenate([getattr(k, f) for k in self.kl]) for f in KLScores.__dataclass_fields__}
        n = len(cat["kld"])
        m_q, _ = mean_and_uncertainty(cat["nll"])
        m_b, _ = mean_and_uncertainty(cat["nll_base"])
        kld = np.sort(cat["kld"])
        kl_mean, kl_unc = mean_and_uncertainty(cat["kld"])
        top = float(cat["same_top"].sum()) / n
        dp_mean, dp_unc = mean_and_uncertainty(cat["p_diff"])
        p2 = cat["p_diff"].astype(np.float64) ** 2
        out.update(
            ppl_base=math.exp(m_b), ppl_ratio=math.exp(m_q - m_b),
            kl_mean=kl_mean, kl_unc=kl_unc, kl_median=median(kld), kl_p90=percentile(kld, 0.90),
            kl_p95=percentile(kld, 0.95), kl_p99=percentile(kld, 0.99), kl_p999=percentile(kld, 0.999),
            kl_max=float(kld[-1]), top1=top, top1_unc=math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
            dp_mean=dp_mean, dp_mean_unc=dp_unc, dp_rms=math.sqrt(float(p2.sum() / n)))
        return out
