"""The C hot path (patches/0003) against the Python safe point it replaces, on real llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from dymoe_gguf import Controller
from dymoe_gguf._native.llama import last_logits
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.errors import DymoeError

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 111, 119]


def _has_hot_path() -> bool:
    import llama_cpp  # noqa: F401

    from dymoe_gguf.runtime.loader import hot_library

    return hot_library() is not None


pytestmark = pytest.mark.skipif(not _has_hot_path(), reason="needs the patched llama.cpp with patches/0003")


@pytest.fixture(scope="module")
def q8(bundle):
    return bundle("qwen3moe", base_tier=Tier.Q8_0, n_layer=3, n_expert=16, skew=0.5)


def _decode(llm, n: int) -> list[np.ndarray]:
    """Greedy decode; each step's logits (llama.cpp's own buffer: without logits_all, ``llm.scores`` is
    never written and holds uninitialised memory)."""
    llm.reset()
    llm.eval(PROMPT)
    rows = [np.array(last_logits(llm))]
    for _ in range(n):
        llm.eval([int(np.argmax(rows[-1]))])
        rows.append(np.array(last_logits(llm)))
    assert all(np.isfinite(r).all() for r in rows)
    return rows


@pytest.mark.parametrize("policy", ["uniform:Q2_K", "uniform:Q4_K"])
def test_native_and_python_safe_points_give_bit_identical_logits(q8, policy):
    out = {}
    for hot in ("python", "auto"):
        with Controller.open(q8, policy=policy, memory_budget="64MiB", hot_path=hot) as ctl:
            llm = ctl.llama(n_ctx=128, n_threads=2)
            calls = ctl.observer.calls
            out[hot] = _decode(llm, 12)
            s = ctl.stats()
            assert s.hot_path == ("native" if hot == "auto" else "python") and s.callback_error is None
            if hot == "auto":  # the Python eval callback is not called once the C hook runs
                assert ctl.observer.calls == calls and s.callback_calls == 13 * 3  # one hook per layer and decode
    for a, b in zip(out["python"], out["auto"]):
        assert np.array_equal(a, b)


def test_the_c_log_is_the_routing_python_observes(q8):
    with Controller.open(q8, policy="uniform:Q4_K", hot_path="python") as ctl:
        llm = ctl.llama(n_ctx=128, n_threads=2)
        ctl.trace = []
        llm.eval(PROMPT)
        trace = list(ctl.trace)
    with Controller.open(q8, policy="uniform:Q4_K") as ctl:
        llm = ctl.llama(n_ctx=128, n_threads=2)
        hot = ctl.native.hot
        ctl.guard.after_decode = None  # no drain after the decode: read the log drain() would read
        llm.eval(PROMPT)
        layers, ids, weights, dropped = hot.take_log()
    assert dropped == 0
    for r in trace:  # the last layer keeps output rows only: compare its last row
        sel = layers == r.moe_index
        n = min(sel.sum(), len(r.ids))
        assert np.array_equal(np.sort(ids[sel][-n:], 1), np.sort(r.ids[-n:], 1))
        order_c, order_py = np.argsort(ids[sel][-n:], 1), np.argsort(r.ids[-n:], 1)
        np.testing.assert_allclose(np.take_along_axis(weights[sel][-n:], order_c, 1),
                                   np.take_along_axis(r.weights[-n:], order_py, 1), rtol=1e-4, atol=1e-6)


def test_misses_are_read_under_the_budget_and_prediction_is_scored(q8):
    idx = BundleIndex(q8)
    budget = int(idx.expert_bytes()[..., 0].sum() * 0.6)
    with Controller.open(q8, policy="dymoe", memory_budget=budget, lookahead=1) as ctl:
        llm = ctl.llama(n_ctx=512, n_batch=8, n_threads=2, logits_all=True)
        _decode(llm, 120)
        s = ctl.stats()
        pager = ctl.pager
        vt = ctl.step.planner.view_tiers
        for mi, layer in enumerate(ctl.moe_layers):  # the flags C reads follow the pager's model
            full = pager.full[layer, np.arange(idx.n_expert), vt[mi]]
            model = pager.model[layer, np.arange(idx.n_expert), vt[mi]]
            assert np.array_equal(pager.ready[layer].astype(bool), model >= full)
    assert s.hot_path == "native" and s.callback_error is None
    assert s.pager["demand_reads"] > 0 and s.hit_rate is not None and s.hit_rate < 1
    assert s.max_resident_expert_bytes <= 1.05 * budget
    assert s.lookahead_recall is not None and 0 < s.lookahead_recall <= 1
    assert s.callback_seconds > 0 and s.tokens >= 120


def test_a_batch_over_the_budget_is_read_at_the_lowest_tier_inside_the_hook(q8):
    """The miss function re-points views inside MUL_MAT_ID (types reserved, so the work buffer
    planned before the hook fits): the batch runs, under the budget."""
    idx = BundleIndex(q8)
    sizes = idx.expert_bytes()
    layer_q8 = int(sizes[idx.moe_layers[0], :, -1].sum())
    with Controller.open(q8, policy="uniform:Q8_0", memory_budget=int(0.7 * layer_q8)) as ctl:
        llm = ctl.llama(n_ctx=256, n_batch=64, n_threads=2)
        llm.eval(list(range(64)))
        s = ctl.stats()
    assert s.hot_path == "native" and s.lowered_batches > 0 and s.callback_error is None
    assert s.max_resident_expert_bytes <= 1.05 * int(0.7 * layer_q8)


def test_recording_a_trace_moves_the_safe_point_back_to_python(q8):
    with Controller.open(q8, policy="uniform:Q4_K") as ctl:
        llm = ctl.llama(n_ctx=128, n_threads=2)
        assert ctl.stats().hot_path == "native"
        ctl.trace = []
        llm.eval(PROMPT)
        assert ctl.stats().hot_path == "python" and len(ctl.trace) == len(ctl.moe_layers)


def test_a_failure_in_the_miss_path_surfaces_after_the_decode(q8):
    idx = BundleIndex(q8)
    with Controller.open(q8, policy="dymoe", memory_budget=int(idx.expert_bytes()[..., 0].sum() * 0.6)) as ctl:
        llm = ctl.llama(n_ctx=128, n_batch=8, n_threads=2)
        use = ctl.pager.use

        def failing(*args):
            raise OSError("planted read failure")

        ctl.pager.use = failing  # a fault injected into the real pager, not a stand-in runtime
        with pytest.raises(DymoeError, match="planted read failure"):
            llm.eval(PROMPT)
        ctl.pager.use = use
        llm.eval(PROMPT[:4])  # usable again
