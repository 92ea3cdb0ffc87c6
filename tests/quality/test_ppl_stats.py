"""llama-perplexity's statistics in numpy (dymoe_gguf.quality.ppl_stats): the definitions it copies.

The end-to-end check against the real tool is tests/quality/test_llama_perplexity.py; these pin the
details that decide the last digits: the 16-bit storage of the reference, the -16 cut-off, first-index
argmax, the percentile interpolation and the uncertainty rule.
"""

from __future__ import annotations

import math

import numpy as np

from dymoe_gguf.quality import ppl_stats


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_stored_log_probs_are_within_half_a_step():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((16, 500)) * 4).astype(np.float32)
    stored = ppl_stats.store_log_probs(logits)
    exact = _log_softmax(logits)
    top = exact.max(-1, keepdims=True)
    inside = exact > top - 16 + 1e-3                     # the stored range: 16 below the largest
    err = np.abs(stored.values() - exact)[inside]
    assert err.max() <= float(stored.scale.max()) / 2 + 1e-5
    assert np.all(stored.values()[~inside] <= top.repeat(500, 1)[~inside] - 16 + 1e-3)


def test_kl_against_itself_is_the_storage_floor_and_top1_agrees():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((64, 1000)) * 3).astype(np.float32)
    targets = rng.integers(0, 1000, 64)
    s = ppl_stats.kl_scores(logits, ppl_stats.store_log_probs(logits), targets)
    assert np.all(np.abs(s.kld) < 1e-4) and abs(float(s.kld.mean())) < 1e-5 and s.same_top.all()
    np.testing.assert_allclose(s.nll, ppl_stats.nll(logits, targets), rtol=1e-5)
    np.testing.assert_allclose(s.nll_base, s.nll, atol=float(ppl_stats.store_log_probs(logits).scale.max()))


def test_kl_matches_the_definition_above_the_cutoff():
    rng = np.random.default_rng(2)
    ref = (rng.standard_normal((8, 300)) * 2).astype(np.float32)
    q = (ref + 0.3 * rng.standard_normal((8, 300))).astype(np.float32)
    stored = ppl_stats.store_log_probs(ref)
    got = ppl_stats.kl_scores(q, stored, np.zeros(8, dtype=int)).kld
    lp = stored.values().astype(np.float64)
    keep = lp > -16
    want = (np.where(keep, np.exp(lp) * (lp - _log_softmax(q)), 0)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_percentile_median_and_uncertainty_follow_perplexity_cpp():
    v = np.sort(np.array([0.0, 1.0, 2.0, 10.0], dtype=np.float32))
    # position fraction * (n - 1): 0.99 * 3 = 2.97 -> 0.03 * v[2] + 0.97 * v[3]
    assert ppl_stats.percentile(v, 0.5) == 1.5 and math.isclose(ppl_stats.percentile(v, 0.99), 9.76, rel_tol=1e-6)
    assert ppl_stats.percentile(v, 0.0) == 0.0 and ppl_stats.percentile(v, 1.0) == 10.0
    assert ppl_stats.median(v) == 1.5 and ppl_stats.median(v[:3]) == 1.0
    assert ppl_stats.mean_and_uncertainty(np.arange(10.0)) == (4.5, 0.0)  # no uncertainty below 11 values
    m, u = ppl_stats.mean_and_uncertainty(np.arange(11.0))
    assert m == 5.0 and math.isclose(u, math.sqrt(10.0 / 10))


def test_summary_keys_and_ppl():
    acc = ppl_stats.Accumulator()
    acc.add(np.full(200, math.log(50.0)))
    s = acc.summary()
    assert math.isclose(s["ppl"], 50.0) and s["ppl_unc"] < 1e-5 and s["kl_mean"] is None and s["top1"] is None
