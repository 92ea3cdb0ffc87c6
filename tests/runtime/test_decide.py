"""Tests of the decide layer (policy) on synthetic, seeded routing traces. Pure numpy, fast."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime.decide import (
    AllocationConfig,
    Assignment,
    DepthSchedule,
    ImportanceConfig,
    ImportanceProfile,
    ImportanceTracker,
    LookaheadStats,
    Planner,
    Predictor,
    PrefetchGate,
    RoutingTrace,
    SkipConfig,
    allocate,
    allocate_per_layer,
    assignment_bytes,
    captured_value,
    count_hits,
    expert_load,
    gate_mass,
    normalized_entropy,
    popularity_recall,
    predict,
    recall,
    skip_slots,
    transition_predictability,
)

# Bytes per block / weights per block of the three tiers (gguf's GGML_QUANT_SIZES): Q2_K, Q4_K, Q8_0.
TIER_BYTES = ((84, 256), (144, 256), (34, 32))


# ---------------------------------------------------------------------------------------------
# Synthetic routing


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def zipf_trace(n_tokens: int, n_layer: int, n_expert: int, k: int, *, skew: float = 1.0, seed: int = 0) -> RoutingTrace:
    """Router whose expert popularity follows Zipf(skew), hot experts permuted per layer.

    Gumbel-top-k on log-prior logits: each token draws k distinct experts with probability
    proportional to the prior, independently across layers and tokens.
    """
    rng = np.random.default_rng(seed)
    prior = 1.0 / np.arange(1, n_expert + 1) ** skew
    log_prior = np.stack([np.log(prior[rng.permutation(n_expert)]) for _ in range(n_layer)])
    logits = log_prior[None] + rng.gumbel(size=(n_tokens, n_layer, n_expert))  # (T, L, E)
    ids = np.argsort(-logits, axis=2)[..., :k]
    weights = _softmax(np.take_along_axis(logits, ids, axis=2))
    return RoutingTrace(ids=ids, weights=weights, n_expert=n_expert, probs=_softmax(logits))


def planted_trace(n_tokens: int, n_layer: int, n_expert: int, k: int, seed: int = 0) -> RoutingTrace:
    """Layer 0 routes Zipf-like; layer l+1 picks perm_l[e] for each expert e picked at layer l."""
    base = zipf_trace(n_tokens, 1, n_expert, k, seed=seed)
    rng = np.random.default_rng(seed + 1)
    layers = [base.ids[:, 0]]
    for _ in range(n_layer - 1):
        layers.append(rng.permutation(n_expert)[layers[-1]])
    ids = np.stack(layers, axis=1)
    weights = np.repeat(base.weights, n_layer, axis=1)
    return RoutingTrace(ids=ids, weights=weights, n_expert=n_expert)


def tier_sizes(n_layer: int, n_expert: int, n_weights: int = 3 * 256 * 64) -> np.ndarray:
    """Bytes per (layer, expert, tier) for an expert of ``n_weights`` weights, int64 [L, E, 3]."""
    per_tier = [n_weights // block * size for size, block in TIER_BYTES]
    return np.broadcast_to(np.array(per_tier, dtype=np.int64), (n_layer, n_expert, 3)).copy()


def zipf_scores(n_layer: int, n_expert: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, n_expert + 1)
    return np.stack([base[rng.permutation(n_expert)] for _ in range(n_layer)])


# ---------------------------------------------------------------------------------------------
# trace.py


def test_trace_is_immutable_without_freezing_the_callers_arrays():
    trace = zipf_trace(50, 3, 8, 2, seed=1)
    assert trace.n_expert == 8 and trace.ids.dtype == np.int32
    with pytest.raises(ValueError):
        trace.ids[0, 0, 0] = 1  # a trace is immutable
    mine = np.zeros((2, 1, 1), dtype=np.int32)
    RoutingTrace(ids=mine, weights=np.ones((2, 1, 1)), n_expert=1)
    mine[0] = 0  # ... without freezing the caller's array


def test_trace_validates_shapes_and_ids():
    ids = np.zeros((3, 2, 2), dtype=np.int32)
    with pytest.raises(ValueError, match="expert ids"):
        RoutingTrace(ids=ids + 4, weights=np.ones((3, 2, 2)), n_expert=4)
    with pytest.raises(ValueError, match="weights"):
        RoutingTrace(ids=ids, weights=np.ones((3, 2, 3)), n_expert=4)
    with pytest.raises(ValueError, match="probs"):
        RoutingTrace(ids=ids, weights=np.ones((3, 2, 2)), n_expert=4, probs=np.ones((3, 2, 5)))


def test_trace_concatenate():
    a, b = zipf_trace(5, 2, 6, 2, seed=1), zipf_trace(7, 2, 6, 2, seed=2)
    joined = RoutingTrace.concatenate([a, b])
    assert joined.n_tokens == 12
    np.testing.assert_array_equal(joined.ids[5:], b.ids)
    with pytest.raises(ValueError):
        RoutingTrace.concatenate([a, zipf_trace(5, 3, 6, 2)])


def test_expert_load_and_gate_mass():
    trace = zipf_trace(400, 3, 16, 4, seed=3)
    load, mass = expert_load(trace), gate_mass(trace)
    assert load.shape == mass.shape == (3, 16)
    np.testing.assert_allclose(load.sum(axis=1), 4.0)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, rtol=1e-5)
    # Hand count for one (layer, expert).
    expert = int(trace.ids[0, 1, 0])
    assert load[1, expert] == pytest.approx(np.mean((trace.ids[:, 1] == expert).any(axis=1)))
    # The skewed router's top expert takes more than the uniform share.
    assert load.max(axis=1).min() > 4 / 16


def test_normalized_entropy():
    uniform = np.ones((1, 8))
    one_hot = np.zeros((1, 8))
    one_hot[0, 3] = 5.0
    np.testing.assert_allclose(normalized_entropy(uniform), [1.0])
    np.testing.assert_allclose(normalized_entropy(one_hot), [0.0], atol=1e-12)
    skewed = normalized_entropy(expert_load(zipf_trace(2000, 2, 16, 2, skew=1.2, seed=4)))
    assert np.all((skewed > 0.5) & (skewed < 0.99))
    assert np.isnan(normalized_entropy(np.zeros((1, 4)))[0])


def test_transition_predictability_planted_mapping_is_perfect():
    trace = planted_trace(2000, 4, 16, 2, seed=5)
    np.testing.assert_allclose(transition_predictability(trace), 1.0)
    # The skewed layer-0 routing alone explains much less.
    assert np.all(popularity_recall(trace) < 0.8)


def test_transition_predictability_scores_each_pair_of_layers():
    """Planted l→l+1 mappings at pairs (0, 1) and (2, 3), fresh random routing at layer 2:
    only the planted pairs are predictable, and only from the layer just before."""
    n_expert, k = 16, 2
    planted = planted_trace(3000, 2, n_expert, k, seed=7)
    fresh = planted_trace(3000, 2, n_expert, k, seed=8)
    trace = RoutingTrace(
        ids=np.concatenate([planted.ids, fresh.ids], axis=1),
        weights=np.concatenate([planted.weights, fresh.weights], axis=1),
        n_expert=n_expert,
    )
    pred = transition_predictability(trace)
    np.testing.assert_allclose(pred[[0, 2]], 1.0)
    baseline = popularity_recall(trace)
    assert baseline[1] < 0.6 and pred[1] == pytest.approx(baseline[1], abs=0.03)


def test_transition_predictability_independent_routing_is_chance():
    n_expert, k = 16, 2
    trace = zipf_trace(6000, 4, n_expert, k, skew=0.0, seed=6)  # uniform and independent
    pred = transition_predictability(trace)
    assert pred.shape == (3,)
    np.testing.assert_allclose(pred, k / n_expert, atol=0.02)
    np.testing.assert_allclose(popularity_recall(trace), k / n_expert, atol=0.02)


# ---------------------------------------------------------------------------------------------
# depth.py


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_depth_schedule_monotone_with_exact_endpoints(kind):
    schedule = DepthSchedule(kind=kind, r_max=0.8, r_min=0.2)
    shares = schedule.shares(9)
    assert shares[0] == 0.8 and shares[-1] == 0.2
    assert np.all(np.diff(shares) < 0)
    assert shares[4] == pytest.approx(0.5)  # both curves pass the midpoint at mid-depth


def test_depth_cosine_formula_and_shape():
    shares = DepthSchedule(kind="cosine", r_max=0.9, r_min=0.1).shares(7)
    depth = np.arange(7)
    np.testing.assert_allclose(shares, 0.1 + 0.8 * (1 + np.cos(np.pi * depth / 6)) / 2)
    linear = DepthSchedule(kind="linear", r_max=0.9, r_min=0.1).shares(7)
    assert np.all(shares[1:3] > linear[1:3]) and np.all(shares[4:6] < linear[4:6])


def test_depth_endpoints_are_exact_in_floating_point():
    for kind in ("cosine", "linear"):
        shares = DepthSchedule(kind=kind, r_max=0.11, r_min=0.04).shares(5)
        assert shares[0] == 0.11 and shares[-1] == 0.04  # 0.04 + (0.11 − 0.04) != 0.11 in float


def test_depth_constant_single_layer_and_caps():
    np.testing.assert_array_equal(DepthSchedule(kind="constant", r_max=0.3, r_min=0.0).shares(4), 0.3)
    assert DepthSchedule(r_max=0.6, r_min=0.1).shares(1).tolist() == [0.6]
    caps = DepthSchedule(kind="constant", r_max=0.3, r_min=0.3).caps(3, 10)
    assert caps.tolist() == [3, 3, 3]
    assert DepthSchedule(kind="constant", r_max=0.57).caps(1, 100).tolist() == [57]  # 0.57·100 < 57 in float


def test_depth_rejects_bad_config():
    with pytest.raises(RuntimeConfigError, match="r_min <= r_max"):
        DepthSchedule(r_max=0.2, r_min=0.5)
    with pytest.raises(RuntimeConfigError, match="kind"):
        DepthSchedule(kind="exponential")  # type: ignore[arg-type]
    with pytest.raises(RuntimeConfigError, match="tier >= -1"):
        DepthSchedule(pins={0: -2})
    schedule = DepthSchedule(pins={5: 1})
    with pytest.raises(RuntimeConfigError, match="layers < 4"):
        schedule.check_pins(4, 3)
    with pytest.raises(RuntimeConfigError, match="tier < 1"):
        DepthSchedule(pins={0: 1}).check_pins(4, 1)
    pins = {0: 2}
    frozen = DepthSchedule(pins=pins)
    pins[1] = 0
    assert dict(frozen.pins) == {0: 2} and hash(frozen) == hash(DepthSchedule(pins={0: 2}))


# ---------------------------------------------------------------------------------------------
# importance.py


def test_importance_matches_reference_ema():
    n_layer, n_expert, k, half_life = 2, 8, 2, 5.0
    tracker = ImportanceTracker(n_layer, n_expert, k, ImportanceConfig(half_life_tokens=half_life))
    rng = np.random.default_rng(7)
    a = 0.5 ** (1 / half_life)
    ref_mass, ref_freq = np.zeros((n_layer, n_expert)), np.zeros((n_layer, n_expert))
    for _ in range(60):
        for layer in range(n_layer):
            ids = np.stack([rng.choice(n_expert, k, replace=False)]).astype(np.int32)
            weights = _softmax(rng.normal(size=(1, k))).astype(np.float32)
            tracker.update(layer, ids, weights)
            x_mass, x_freq = np.zeros(n_expert), np.zeros(n_expert)
            x_mass[ids[0]], x_freq[ids[0]] = weights[0], 1.0
            ref_mass[layer] = a * ref_mass[layer] + (1 - a) * x_mass
            ref_freq[layer] = a * ref_freq[layer] + (1 - a) * x_freq
    np.testing.assert_allclose(tracker.mass, ref_mass, rtol=1e-6)
    np.testing.assert_allclose(tracker.freq, ref_freq, rtol=1e-6)
    assert tracker.tokens_seen == 60


def test_importance_half_life_and_batch_update():
    cfg = ImportanceConfig(half_life_tokens=8)
    one = ImportanceTracker(1, 4, 1, cfg)
    one.seed(ImportanceProfile(freq=np.ones((1, 4)), mass=np.ones((1, 4))))
    for _ in range(8):
        one.update(0, np.array([[0]]), np.array([[1.0]]))
    assert one.freq[0, 1] == pytest.approx(0.5)  # never selected: halved after one half-life
    # A batch of identically routed tokens equals the same tokens one by one.
    batch = ImportanceTracker(1, 4, 1, cfg)
    batch.seed(ImportanceProfile(freq=np.ones((1, 4)), mass=np.ones((1, 4))))
    batch.update(0, np.zeros((8, 1), dtype=np.int32), np.ones((8, 1)))
    np.testing.assert_allclose(batch.freq, one.freq)
    np.testing.assert_allclose(batch.mass, one.mass)


def test_importance_scores_mix_and_seed():
    trace = zipf_trace(300, 2, 8, 2, seed=8)
    profile = ImportanceProfile.from_trace(trace)
    only_mass = ImportanceTracker(2, 8, 2, ImportanceConfig(mass_weight=1.0))
    only_freq = ImportanceTracker(2, 8, 2, ImportanceConfig(mass_weight=0.0))
    for tracker in (only_mass, only_freq):
        tracker.seed(profile)
    np.testing.assert_allclose(only_mass.scores, profile.mass)
    np.testing.assert_allclose(only_freq.scores, profile.freq / 2)
    np.testing.assert_allclose(only_freq.scores.sum(axis=1), 1.0)  # both terms on one scale
    with pytest.raises(ValueError, match="profile of shape"):
        only_mass.seed(ImportanceProfile(freq=np.ones((3, 8)), mass=np.ones((3, 8))))
    with pytest.raises(RuntimeConfigError):
        ImportanceConfig(half_life_tokens=0)


def test_importance_update_cost_decode_shapes():
    n_layer, n_expert, k, steps = 48, 128, 8, 200
    tracker = ImportanceTracker(n_layer, n_expert, k)
    rng = np.random.default_rng(9)
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(64)]).astype(np.int32)
    ids = ids[:, None, :]  # (64, 1, k): as llama.cpp hands them, one token per call
    weights = _softmax(rng.normal(size=(64, 1, k))).astype(np.float32)
    start = time.perf_counter()
    for step in range(steps):
        for layer in range(n_layer):
            tracker.update(layer, ids[(step + layer) % 64], weights[(step + layer) % 64])
    per_call_us = (time.perf_counter() - start) / (steps * n_layer) * 1e6
    whole = ImportanceTracker(n_layer, n_expert, k)
    token_ids = np.stack([ids[(np.arange(n_layer) + step) % 64, 0] for step in range(steps)])  # (S, L, k)
    token_weights = np.stack([weights[(np.arange(n_layer) + step) % 64, 0] for step in range(steps)])
    start = time.perf_counter()
    for step in range(steps):
        whole.update_token(token_ids[step], token_weights[step])
    per_token_us = (time.perf_counter() - start) / steps * 1e6
    print(
        f"\nImportanceTracker, L={n_layer} E={n_expert} k={k}: update {per_call_us:.2f} µs per call "
        f"(per layer), update_token {per_token_us:.2f} µs per token (all layers)"
    )
    a = 0.5 ** (1 / tracker.cfg.half_life_tokens)
    # From zeros, k distinct selections per token: every freq row sums to k·(1 − a^steps).
    np.testing.assert_allclose(tracker.freq.sum(axis=1), k * (1 - a**steps), rtol=1e-9)
    np.testing.assert_allclose(tracker.mass.sum(axis=1), 1 - a**steps, rtol=1e-5)
    # Folding a whole token at once is the same as layer by layer.
    np.testing.assert_allclose(whole.freq, tracker.freq, rtol=1e-12)
    np.testing.assert_allclose(whole.mass, tracker.mass, rtol=1e-12)
    assert whole.tokens_seen == tracker.tokens_seen == steps


# ---------------------------------------------------------------------------------------------
# allocate.py


def _count_above_lowest(tiers: np.ndarray) -> np.ndarray:
    return (tiers >= 1).sum(axis=1)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.35, 0.6, 0.9, 1.2])
def test_allocate_respects_budget_caps_and_pins(fraction):
    n_layer, n_expert = 6, 32
    sizes = tier_sizes(n_layer, n_expert)
    scores = zipf_scores(n_layer, n_expert, seed=10)
    schedule = DepthSchedule(kind="cosine", r_max=0.5, r_min=0.125, pins={0: 2, 5: 0})
    pinned = int(sizes[0, :, 2].sum() + sizes[5, :, 0].sum())
    budget = pinned + int(fraction * sizes[:, :, 2].sum())
    result = allocate(scores, sizes, budget, schedule)
    assert result.tiers.dtype == np.int8 and result.tiers.shape == (n_layer, n_expert)
    assert result.bytes == assignment_bytes(result.tiers, sizes) <= budget
    assert np.all(result.tiers[0] == 2) and np.all(result.tiers[5] == 0)
    caps = schedule.caps(n_layer, n_expert)
    assert np.all(_count_above_lowest(result.tiers)[1:5] <= caps[1:5])
    # The budget is used: whatever is left cannot buy even the cheapest step still open.
    held = result.tiers.astype(int)
    above = _count_above_lowest(held)
    open_steps = [
        sizes[layer, e, t + 1] - (sizes[layer, e, t] if t >= 0 else 0)
        for layer in range(1, 5)
        for e in range(n_expert)
        for t in [held[layer, e]]
        if t < 0 or (t < 2 and (t >= 1 or above[layer] < caps[layer]))
    ]
    if open_steps:
        assert budget - result.bytes < min(open_steps)


def test_allocate_gives_high_tiers_to_the_most_important():
    n_layer, n_expert = 4, 32
    sizes, scores = tier_sizes(n_layer, n_expert), zipf_scores(n_layer, n_expert, seed=11)
    schedule = DepthSchedule(kind="linear", r_max=0.5, r_min=0.25)
    result = allocate(scores, sizes, int(sizes[:, :, 2].sum()), schedule)
    caps = schedule.caps(n_layer, n_expert)
    for layer in range(n_layer):
        upgraded = np.flatnonzero(result.tiers[layer] >= 1)
        assert upgraded.size == caps[layer]  # ample budget: the cap binds
        top = np.argsort(-scores[layer])[: caps[layer]]
        assert set(upgraded) == set(top)


def test_allocate_fills_budget_exactly_and_evicts_least_important_first():
    n_layer, n_expert = 3, 16
    sizes, scores = tier_sizes(n_layer, n_expert), zipf_scores(n_layer, n_expert, seed=12)
    lowest_only = DepthSchedule(kind="constant", r_max=0.0, r_min=0.0)
    all_lowest = int(sizes[:, :, 0].sum())
    exact = allocate(scores, sizes, all_lowest, lowest_only)
    assert np.all(exact.tiers == 0) and exact.bytes == all_lowest
    short = allocate(scores, sizes, all_lowest - 1, lowest_only)
    assert (short.tiers == -1).sum() == 1
    assert scores[short.tiers == -1][0] == scores.min()
    half = allocate(scores, sizes, all_lowest // 2, lowest_only)
    resident, evicted = scores[half.tiers >= 0], scores[half.tiers == -1]
    assert evicted.size > 0 and resident.min() >= evicted.max()
    assert np.all(allocate(scores, sizes, 0, lowest_only).tiers == -1)


def test_allocate_fills_leftover_budget_after_the_first_step_that_does_not_fit():
    sizes = tier_sizes(1, 2)
    q2, q4, q8 = (int(b) for b in sizes[0, 0])
    scores = np.array([[10.0, 1.0]])
    # Greedy order: A resident, A→Q4, A→Q8 (does not fit), B resident (fits in what is left).
    result = allocate(scores, sizes, q4 + q2, DepthSchedule(kind="constant", r_max=1.0))
    assert result.tiers.tolist() == [[1, 0]] and result.bytes == q4 + q2


def test_allocate_pools_steps_of_non_concave_tier_values():
    sizes = tier_sizes(1, 2)
    q2, q4, q8 = (int(b) for b in sizes[0, 0])
    cfg = AllocationConfig(tier_values=(1.0, 1.1, 3.0))  # Q4 barely helps, Q8 a lot
    schedule = DepthSchedule(kind="constant", r_max=1.0)
    scores = np.array([[1.0, 0.5]])
    # Q4 + Q8 together pay 2.0 / (q8 − q2) per byte for A, more than B's residency 0.5 / q2:
    # A goes to Q8 and B stays out, which captures 3.0 instead of 1.1 + 0.5.
    result = allocate(scores, sizes, q8 + q2 // 2, schedule, cfg=cfg)
    assert result.tiers.tolist() == [[2, -1]]
    assert captured_value(scores, result.tiers, cfg) == pytest.approx(3.0)


def test_allocate_does_not_pool_with_steps_the_depth_cap_bars():
    sizes = tier_sizes(2, 1)
    q8 = int(sizes[0, 0, 2])
    cfg = AllocationConfig(tier_values=(0.1, 0.2, 3.0))  # residency alone is worth little
    schedule = DepthSchedule(kind="linear", r_max=1.0, r_min=0.0)  # layer 1 may not leave Q2
    # Layer 1's expert can only become resident (0.1 for q2 bytes): it must not be ranked as if
    # it could also reach Q8, or it would push layer 0's expert off its far better Q8 upgrade.
    result = allocate(np.array([[0.5], [1.0]]), sizes, q8, schedule, cfg=cfg)
    assert result.tiers.tolist() == [[2], [-1]]


def test_allocate_everything_top_when_budget_and_schedule_allow():
    sizes, scores = tier_sizes(3, 8), zipf_scores(3, 8)
    result = allocate(scores, sizes, int(sizes[:, :, 2].sum()), DepthSchedule(kind="constant", r_max=1.0))
    assert np.all(result.tiers == 2) and result.bytes == sizes[:, :, 2].sum()


def test_greedy_captures_more_importance_than_random_allocations():
    n_layer, n_expert = 8, 64
    sizes = tier_sizes(n_layer, n_expert)
    trace = zipf_trace(3000, n_layer, n_expert, 8, skew=1.1, seed=13)
    scores = ImportanceProfile.from_trace(trace).mass
    schedule = DepthSchedule()
    budget = int(0.55 * sizes[:, :, 1].sum())
    greedy = captured_value(scores, allocate(scores, sizes, budget, schedule).tiers)
    rng = np.random.default_rng(14)
    random_values = [
        captured_value(scores, allocate(rng.random(scores.shape), sizes, budget, schedule).tiers) for _ in range(20)
    ]
    print(f"\ncaptured importance: greedy {greedy:.3f}, random best {max(random_values):.3f}")
    assert greedy > max(random_values)
    assert greedy > 1.1 * np.mean(random_values)


def _jitter_rounds(margin: float, rounds: int = 40) -> int:
    n_layer, n_expert = 4, 32
    sizes, base = tier_sizes(n_layer, n_expert), zipf_scores(n_layer, n_expert, seed=15)
    schedule = DepthSchedule(kind="constant", r_max=0.5)
    cfg = AllocationConfig(promote_margin=margin)
    budget = int(0.5 * sizes[:, :, 2].sum())
    rng = np.random.default_rng(16)
    current = allocate(base, sizes, budget, schedule, cfg=cfg)
    changes = 0
    for _ in range(rounds):
        jittered = base * rng.uniform(0.92, 1.08, size=base.shape)  # < 1.25 apart at worst
        nxt = allocate(jittered, sizes, budget, schedule, current=current, cfg=cfg)
        assert nxt.bytes <= budget
        changes += current.n_changes(nxt)
        current = nxt
    return changes


def test_hysteresis_jitter_does_not_flip_tiers():
    assert _jitter_rounds(margin=0.25) == 0
    assert _jitter_rounds(margin=0.0) > 0  # the same jitter flaps without hysteresis


def test_hysteresis_sustained_change_moves_tiers():
    n_layer, n_expert = 2, 32
    sizes, scores = tier_sizes(n_layer, n_expert), zipf_scores(n_layer, n_expert, seed=17)
    schedule = DepthSchedule(kind="constant", r_max=0.25)
    budget = int(0.5 * sizes[:, :, 2].sum())
    current = allocate(scores, sizes, budget, schedule)
    low = int(np.argmin(np.where(current.tiers[0] >= 0, scores[0], np.inf)))
    high = int(np.argmax(scores[0]))
    assert current.tiers[0, low] <= 0 and current.tiers[0, high] == 2
    changed = scores.copy()
    changed[0, low], changed[0, high] = 2 * scores[0].max(), scores[0].min() / 2
    moved = allocate(changed, sizes, budget, schedule, current=current)
    assert moved.tiers[0, low] > current.tiers[0, low]
    assert moved.tiers[0, high] < current.tiers[0, high]
    assert moved.bytes <= budget
    changes = current.diff(moved)
    assert len(changes) == current.n_changes(moved) >= 2
    assert any(c.layer == 0 and c.expert == low and c.old == current.tiers[0, low] for c in changes)
    # A smaller budget still holds with a current assignment in force.
    assert allocate(changed, sizes, budget // 3, schedule, current=moved).bytes <= budget // 3


def test_allocate_rejects_pins_over_budget_and_bad_sizes():
    sizes, scores = tier_sizes(2, 4), zipf_scores(2, 4)
    with pytest.raises(RuntimeConfigError, match="pinned layers"):
        allocate(scores, sizes, int(sizes[0, :, 2].sum()) - 1, DepthSchedule(pins={0: 2}))
    with pytest.raises(ValueError, match="low → high"):
        allocate(scores, sizes[:, :, ::-1], 10**9)
    with pytest.raises(RuntimeConfigError, match="tier_values"):
        allocate(scores, sizes, 10**9, cfg=AllocationConfig(tier_values=(1.0, 2.0)))


def test_allocate_per_layer_uniform_tiers_within_budget():
    n_layer, n_expert = 8, 16
    sizes, scores = tier_sizes(n_layer, n_expert), zipf_scores(n_layer, n_expert, seed=18)
    for fraction in (0.1, 0.4, 0.7, 1.0):
        budget = int(fraction * sizes[:, :, 2].sum())
        result = allocate_per_layer(scores, sizes, budget, DepthSchedule(pins={3: 1}))
        layer_tiers = result.layer_tiers()
        assert layer_tiers is not None and layer_tiers[3] == 1
        assert result.bytes == assignment_bytes(result.tiers, sizes) <= budget
    assert allocate(scores, sizes, int(0.4 * sizes[:, :, 2].sum())).layer_tiers() is None


def test_allocate_per_layer_prefers_early_layers_and_important_ones():
    n_layer, n_expert = 8, 16
    sizes = tier_sizes(n_layer, n_expert)
    equal = np.ones((n_layer, n_expert)) / n_expert
    all_lowest = int(sizes[:, :, 0].sum())
    for budget in (all_lowest + int(sizes[0, :, 1].sum()), int(0.6 * sizes[:, :, 2].sum())):
        for kind in ("cosine", "linear", "constant"):
            tiers = allocate_per_layer(equal, sizes, budget, DepthSchedule(kind=kind)).layer_tiers()
            assert np.all(np.diff(tiers.astype(int)) <= 0), (kind, tiers)
            assert tiers[0] > tiers[-1]
    # Deeper layers slightly more important: a falling schedule still favours the early ones,
    # a constant one follows importance.
    rising = equal * np.linspace(1.0, 1.2, n_layer)[:, None]
    budget = int(0.6 * sizes[:, :, 2].sum())
    falling = allocate_per_layer(rising, sizes, budget, DepthSchedule(kind="cosine")).layer_tiers()
    flat = allocate_per_layer(rising, sizes, budget, DepthSchedule(kind="constant")).layer_tiers()
    assert falling[0] > falling[-1] and flat[0] < flat[-1]
    hot = equal.copy()
    hot[5] *= 3  # one layer carries more importance: it is upgraded first under a constant rule
    one_upgrade = all_lowest + int(sizes[0, :, 1].sum() - sizes[0, :, 0].sum())
    tiers = allocate_per_layer(hot, sizes, one_upgrade, DepthSchedule(kind="constant")).layer_tiers()
    assert tiers[5] == 1 and np.all(np.delete(tiers, 5) == 0)


def _per_layer_jitter_changes(margin: float) -> int:
    n_layer, n_expert = 6, 8
    sizes, base = tier_sizes(n_layer, n_expert), np.ones((n_layer, n_expert))
    schedule = DepthSchedule(kind="constant")
    cfg = AllocationConfig(promote_margin=margin)
    # Every layer at Q4 plus 2.5 layers' Q8 upgrades: two layers at Q8, which two is contested.
    budget = int(sizes[:, :, 1].sum() + 2.5 * (sizes[0, :, 2] - sizes[0, :, 1]).sum())
    rng = np.random.default_rng(19)
    current = allocate_per_layer(base, sizes, budget, schedule, cfg=cfg)
    changes = 0
    for _ in range(20):
        jittered = base * rng.uniform(0.92, 1.08, size=(n_layer, 1))  # whole layers jitter
        nxt = allocate_per_layer(jittered, sizes, budget, schedule, current=current, cfg=cfg)
        changes += current.n_changes(nxt)
        current = nxt
    return changes


def test_allocate_per_layer_hysteresis():
    assert _per_layer_jitter_changes(margin=0.25) == 0
    assert _per_layer_jitter_changes(margin=0.0) > 0


def test_assignment_diff_and_uniform():
    sizes = tier_sizes(2, 3)
    a = Assignment.uniform(0, sizes)
    assert a.bytes == sizes[:, :, 0].sum() and a.layer_tiers().tolist() == [0, 0]
    tiers = a.tiers.copy()
    tiers[1, 2] = -1
    b = Assignment.from_tiers(tiers, sizes)
    assert b.bytes == a.bytes - sizes[1, 2, 0]
    (change,) = a.diff(b)
    assert (change.layer, change.expert, change.old, change.new) == (1, 2, 0, -1)
    assert a.n_changes(a) == 0
    with pytest.raises(ValueError):
        a.tiers[0, 0] = 1  # read-only


# ---------------------------------------------------------------------------------------------
# skip.py


def test_skip_never_drops_top1_and_keeps_the_weight_sum():
    rng = np.random.default_rng(20)
    weights = _softmax(rng.normal(scale=1.5, size=(200, 8))).astype(np.float32)
    ids = np.stack([rng.choice(64, 8, replace=False) for _ in range(200)]).astype(np.int32)
    ids_before, weights_before = ids.copy(), weights.copy()
    out = skip_slots(ids, weights, SkipConfig(threshold=0.1))
    top1 = np.argmax(weights, axis=1)
    rows = np.arange(200)
    assert not out.dropped[rows, top1].any()
    assert out.n_dropped == int(((weights < 0.1) & (np.arange(8) != top1[:, None])).sum()) > 0
    np.testing.assert_allclose(out.weights.sum(axis=1), weights.sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(out.weights[out.dropped], 0.0)
    np.testing.assert_array_equal(
        out.ids[out.dropped], np.broadcast_to(ids[rows, top1][:, None], ids.shape)[out.dropped]
    )
    np.testing.assert_array_equal(out.ids[~out.dropped], ids[~out.dropped])
    # Kept slots keep their proportions.
    kept = np.where(out.dropped, 0, weights)
    np.testing.assert_allclose(
        out.weights, kept / kept.sum(1, keepdims=True) * weights.sum(1, keepdims=True), rtol=1e-5
    )
    np.testing.assert_array_equal(ids, ids_before)  # inputs untouched
    np.testing.assert_array_equal(weights, weights_before)


def test_skip_extremes_relative_and_droppable():
    ids = np.array([[4, 7, 9], [1, 2, 3]], dtype=np.int32)
    weights = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], dtype=np.float32)
    everything = skip_slots(ids, weights, SkipConfig(threshold=1.0))
    assert everything.ids.tolist() == [[7, 7, 7], [1, 1, 1]]  # top-1 is slot 1 in the first row
    np.testing.assert_allclose(everything.weights, [[0, 1, 0], [1, 0, 0]])
    nothing = skip_slots(ids, weights, SkipConfig())
    assert nothing.n_dropped == 0 and nothing.ids.tolist() == ids.tolist()
    relative = skip_slots(ids, weights, SkipConfig(threshold=0.5, relative=True))
    assert relative.dropped.tolist() == [[True, False, False], [False, False, True]]
    droppable = np.zeros(10, dtype=bool)
    droppable[3] = True
    limited = skip_slots(ids, weights, SkipConfig(threshold=1.0), droppable=droppable)
    assert limited.dropped.tolist() == [[False, False, False], [False, False, True]]
    np.testing.assert_allclose(limited.weights[1], [0.6 / 0.9, 0.3 / 0.9, 0.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# lookahead.py


def test_predict_is_router_topk():
    rng = np.random.default_rng(21)
    hidden, router = rng.normal(size=(5, 32)), rng.normal(size=(16, 32))
    probs = _softmax(hidden @ router.T)
    expected = np.argsort(-probs, axis=1)[:, :4]
    predicted = predict(hidden, router, 4)
    assert predicted.dtype == np.int32
    np.testing.assert_array_equal(predicted, expected)
    np.testing.assert_array_equal(predict(hidden[0], router, 4), expected[:1])
    # RMSNorm: the per-token scale cannot change the top-k, the weight vector can.
    gamma = rng.uniform(0.1, 3.0, size=32)
    np.testing.assert_array_equal(predict(hidden, router, 4, norm_weight=gamma), predict(hidden * gamma, router, 4))
    assert not np.array_equal(predict(hidden, router, 4, norm_weight=gamma), expected)
    # Sigmoid gating with a selection bias.
    bias = rng.normal(scale=0.3, size=16)
    sig = 1 / (1 + np.exp(-(hidden @ router.T))) + bias
    np.testing.assert_array_equal(
        predict(hidden, router, 4, bias=bias, gating="sigmoid"), np.argsort(-sig, axis=1)[:, :4]
    )


def test_runtime_predictor_selects_what_predict_selects():
    """Predictor (what the runtime runs) folds the norm weight into the router and drops the RMS
    scale: it must select the same experts as the reference predict(), token by token."""
    rng = np.random.default_rng(23)
    routers = {0: rng.normal(size=(16, 32)), 1: rng.normal(size=(16, 32))}
    norms = {1: rng.uniform(0.1, 3.0, size=32)}
    fast = Predictor(routers, norms, k=4)
    hidden = rng.normal(size=(50, 32)) * rng.uniform(0.01, 100, size=(50, 1))  # very different token scales
    for layer in (0, 1):
        want = predict(hidden, routers[layer], 4, norm_weight=norms.get(layer))
        np.testing.assert_array_equal(np.sort(fast.predict(hidden.astype(np.float32), layer), 1), np.sort(want, 1))
    assert fast.covers(1) and not fast.covers(2)


def test_prefetch_gate_stops_below_the_floor_and_resumes_above_the_band():
    gate = PrefetchGate(2, floor=0.6, alpha=0.5, band=0.1)
    assert gate.on.all()
    gate.update(0, 0.2)  # recent 0.6: at the floor, still on
    assert gate.on[0]
    gate.update(0, 0.2)  # 0.4 < 0.6: off
    assert not gate.on[0] and gate.on[1]
    gate.update(0, 0.9)  # 0.65: above the floor, but inside the band: stays off (no flapping)
    assert not gate.on[0]
    gate.update(0, 0.9)  # 0.775 >= 0.7: on again
    assert gate.on[0]
    always = PrefetchGate(1, floor=0.0)
    for _ in range(20):
        always.update(0, 0.0)
    assert always.on[0]


def test_planner_views_kept_and_manual_tiers():
    sizes = np.array([[[1, 2, 4]] * 4] * 2) * 1000  # [layers, experts, tiers] bytes
    imp = ImportanceTracker(2, 4, 2)
    planner = Planner(sizes, imp, DepthSchedule(), budget=None, per_layer=False, uniform_tier=1)
    planner.replan()
    assert (planner.view_tiers == 1).all() and (planner.kept == 1).all() and planner.layer_tier(0) == 1
    manual = Planner(sizes, imp, DepthSchedule(), budget=None, per_layer=True, manual=True)
    manual.replan()
    assert (manual.view_tiers == -2).all() and manual.layer_tier(1) == -2  # the base copy
    with pytest.raises(RuntimeConfigError, match="one tier per layer"):
        manual.set_manual(np.array([[0, 1, 1, 1], [0, 0, 0, 0]]))
    manual.set_manual(np.array([[2, 2, 2, 2], [-2, -2, -2, -2]]))
    manual.replan()
    assert manual.layer_tier(0) == 2 and manual.layer_tier(1) == -2 and manual.tier_changes == 4
    with pytest.raises(RuntimeConfigError, match="policy 'manual'"):
        planner.set_manual(np.zeros((2, 4)))


def test_recall_known_cases():
    predicted = np.array([[1, 2], [3, 4]])
    actual = np.array([[2, 5], [3, 4]])
    assert count_hits(predicted, actual) == 3
    assert recall(predicted, actual) == 0.75
    assert recall(np.array([[0, 1, 2]]), np.array([[7, 8]])) == 0.0

    stats = LookaheadStats(n_layer=4, max_distance=2)
    assert np.isnan(stats.recall)
    stats.update(1, 1, predicted, actual)  # 3 of 4
    stats.update(2, 1, np.array([[0, 1]]), np.array([[0, 9]]))  # 1 of 2
    stats.update(2, 2, np.array([[5, 6, 7]]), np.array([[8, 9]]))  # 0 of 2, 3 predicted
    assert stats.recall == pytest.approx(4 / 8)
    assert stats.precision == pytest.approx(4 / 9)
    np.testing.assert_allclose(stats.recall_by_layer, [np.nan, 0.75, 0.25, np.nan])
    np.testing.assert_allclose(stats.recall_by_distance, [4 / 6, 0.0])
    assert stats.recall_table[2, 1] == 0.0
    with pytest.raises(ValueError):
        stats.update(1, 3, predicted, actual)
    stats.reset()
    assert np.isnan(stats.recall)


def test_lookahead_on_a_slowly_drifting_residual():
    """Next layer's router on the current hidden state: recall high when the stream drifts
    slowly, near chance when the next layer's input is unrelated."""
    rng = np.random.default_rng(22)
    n_tok, d, n_expert, k = 400, 64, 32, 4
    router = rng.normal(size=(n_expert, d))
    hidden = rng.normal(size=(n_tok, d))
    stats = LookaheadStats(n_layer=2)
    slow = hidden + 0.1 * rng.normal(size=hidden.shape)
    stats.update(1, 1, predict(hidden, router, k), predict(slow, router, k))
    unrelated = LookaheadStats(n_layer=2)
    unrelated.update(1, 1, predict(hidden, router, k), predict(rng.normal(size=hidden.shape), router, k))
    assert stats.recall > 0.8
    assert unrelated.recall < 2 * k / n_expert
