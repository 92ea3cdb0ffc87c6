"""The controller on real llama.cpp: routing observed, views swapped and restored, budget held."""

from __future__ import annotations

import gc
import sys
import threading

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from dymoe_gguf import Controller
from dymoe_gguf._native.llama import open_llama
from dymoe_gguf._native.tensor import TensorState, tensor_at
from dymoe_gguf.bundle import Tier
from dymoe_gguf.cli import cli
from dymoe_gguf.errors import BundleError, RuntimeConfigError
from dymoe_gguf.runtime import decide

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33]


def logits(llm, tokens=PROMPT) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.fixture(scope="module")
def q8_bundle(bundle):
    return bundle("qwen3moe", base_tier=Tier.Q8_0, n_layer=3)


def _router_and_norm(bundle_dir, layer):
    """The router and FFN norm weights of ``layer``, read from the base GGUF (not from the runtime)."""
    import gguf

    r = gguf.GGUFReader(bundle_dir / "model.gguf")
    t = {x.name: np.array(x.data, dtype=np.float32) for x in r.tensors
         if x.name in (f"blk.{layer}.ffn_gate_inp.weight", f"blk.{layer}.ffn_norm.weight")}
    return t[f"blk.{layer}.ffn_gate_inp.weight"], t[f"blk.{layer}.ffn_norm.weight"]


def test_routing_equals_numpy_topk_of_router(bundle):
    """The recorded routing is the reference top-k of each router on the recorded hidden state, and the
    predictor the runtime uses for look-ahead (decide.Predictor, the tested one) picks the same experts."""
    out = bundle("mixtral", base_tier=Tier.F32)
    ctl = Controller.open(out, policy="uniform:Q8_0", lookahead=1)
    try:
        llm = ctl.llama(n_ctx=64, n_threads=2)
        ctl.trace = []
        logits(llm)
        assert ctl.stats().callback_error is None
        predictor = ctl.step.predictor
        assert type(predictor) is decide.lookahead.Predictor  # the runtime's predictor is the tested one
        seen = 0
        for r in ctl.trace:
            layer = ctl.moe_layers[r.moe_index]
            router, norm = _router_and_norm(out, layer)
            pred = decide.predict(r.hidden, router, r.ids.shape[1], norm_weight=norm)
            n = min(len(pred), len(r.ids))  # the last layer keeps output rows only
            assert np.array_equal(np.sort(pred[-n:], 1), np.sort(r.ids[-n:], 1)), (layer, pred, r.ids)
            fast = predictor.predict(r.hidden, r.moe_index)
            assert np.array_equal(np.sort(fast[-n:], 1), np.sort(r.ids[-n:], 1)), (layer, fast, r.ids)
            seen += 1
        assert seen == len(ctl.moe_layers)
    finally:
        ctl.close()


def _modes():
    import llama_cpp  # noqa: F401

    from dymoe_gguf._native import patch

    return ["per-layer", "per-expert"] if patch.load() is not None else ["per-layer"]


@pytest.mark.parametrize("mode", _modes())
def test_layer_swapped_to_tier_matches_bundle_with_that_base(bundle, q8_bundle, mode):
    q2_base = bundle("qwen3moe", base_tier=Tier.Q2_K, n_layer=3)
    plain = open_llama(q2_base / "model.gguf", n_ctx=64, n_threads=2, logits_all=True)
    try:
        want = logits(plain)
    finally:
        plain.close()
    with Controller.open(q8_bundle, policy="uniform:Q2_K", mode=mode) as ctl:
        got = logits(ctl.llama(n_ctx=64, n_threads=2, logits_all=True))
        assert ctl.stats().mode == mode
        assert ctl.stats().view_changes >= len(ctl.moe_layers)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("mode", _modes())
def test_restore_is_bit_exact(q8_bundle, mode):
    plain = open_llama(q8_bundle / "model.gguf", n_ctx=64, n_threads=2, logits_all=True)
    try:
        base = logits(plain)
    finally:
        plain.close()
    ctl = Controller.open(q8_bundle, policy="uniform:Q2_K", lookahead=0, mode=mode)
    try:
        llm = ctl.llama(n_ctx=64, n_threads=2, logits_all=True)
        originals = ctl.views.originals()
        swapped = logits(llm)
        assert not np.array_equal(swapped, base)
        ctl.views.restore()
        for ptr, state in originals.values():
            assert TensorState.read(tensor_at(ptr)) == state
        # the callback must not re-apply views: measure the restored tensors alone
        ctl.views.set_experts = lambda *a, **k: 0
        ctl.views.set_layer = lambda *a, **k: False
        assert np.array_equal(logits(llm), base)
    finally:
        ctl.close()
        ctl.close()  # repeatable


def test_budget_holds_under_eviction(bundle):
    from dymoe_gguf.bundle import BundleIndex

    out = bundle("qwen3moe", base_tier=Tier.Q4_K, n_layer=3, n_expert=16)
    idx = BundleIndex(out)
    sizes = idx.expert_bytes()
    budget = int(sizes[..., 0].sum() * 0.6)  # below even the lowest tier of everything
    with Controller.open(out, memory_budget=budget, policy="dymoe", lookahead=1) as ctl:
        llm = ctl.llama(n_ctx=256, n_threads=2)
        samples = []
        llm.reset()
        llm.eval(PROMPT)
        for _ in range(40):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
            samples.append(ctl.pager.enforce_now() if _ % 10 == 0 else ctl.stats().resident_expert_bytes)
        s = ctl.stats()
        assert s.callback_error is None and s.tokens >= 40
        assert s.pager["evictions"] > 0
        assert max(samples) <= budget * 1.05, (max(samples), budget)
        assert s.hit_rate is not None and s.budget_bytes == budget
        assert s.lookahead_recall is not None and 0 <= s.lookahead_recall <= 1


def test_stats_fields_and_per_layer_mode(q8_bundle):
    with Controller.open(q8_bundle, policy="dymoe", mode="per-layer") as ctl:
        llm = ctl.llama(n_ctx=128, n_threads=2)
        text = llm.create_completion("Hello", max_tokens=6, temperature=0.0)["choices"][0]["text"]
        d = ctl.stats().to_dict()
    assert isinstance(text, str)
    for key in ("mode", "tokens", "lookahead_recall", "tier_changes", "resident_expert_bytes", "budget_bytes",
                "bytes_read", "hit_rate_by_layer"):
        assert key in d
    assert d["mode"] == "per-layer" and d["tokens"] >= 6 and d["callback_calls"] > 0


def test_skip_drops_slots_and_keeps_generating(q8_bundle):
    with Controller.open(q8_bundle, policy="uniform:Q4_K", skip_threshold=0.45) as ctl:
        llm = ctl.llama(n_ctx=128, n_threads=2)
        llm.create_completion("Hello", max_tokens=8, temperature=0.0)
        s = ctl.stats()
    assert s.callback_error is None and s.skipped_slots > 0


@pytest.mark.slow
def test_open_generate_close_100_times_does_not_leak(q8_bundle):
    proc = psutil.Process()

    def cycle():
        with Controller.open(q8_bundle, policy="dymoe", memory_budget="1MiB") as ctl:
            ctl.llama(n_ctx=64, n_threads=1).create_completion("Hi", max_tokens=2, temperature=0.0)

    for _ in range(5):
        cycle()
    gc.collect()
    threads0, rss0 = threading.active_count(), proc.memory_info().rss
    for _ in range(100):
        cycle()
    gc.collect()
    assert threading.active_count() == threads0
    assert proc.memory_info().rss - rss0 < 64 * 2**20


def test_bad_options_are_clear_errors(tmp_path, q8_bundle, bundle, hf_model):
    import shutil

    with pytest.raises(RuntimeConfigError, match="Unknown policy"):
        Controller.open(q8_bundle, policy="fastest")
    with pytest.raises(RuntimeConfigError, match="memory budget"):
        Controller.open(q8_bundle, memory_budget="-1GiB")
    with pytest.raises(RuntimeConfigError, match="not in this bundle"):
        Controller.open(q8_bundle, policy="uniform:Q6_K")
    with pytest.raises(RuntimeConfigError, match="Cannot pin layer 9"):
        Controller.open(q8_bundle, pins={9: "Q2_K"})
    other = bundle("qwen3moe", base_tier=Tier.Q2_K, n_layer=3)
    mixed = tmp_path / "mixed"
    shutil.copytree(q8_bundle, mixed)
    shutil.copy(other / "experts.Q4_K.gguf", mixed / "experts.Q4_K.gguf")
    with pytest.raises(BundleError, match="another conversion"):
        Controller.open(mixed)
    res = CliRunner().invoke(cli, ["run", str(mixed), "-p", "x", "-n", "2"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["run", str(q8_bundle), "-p", "x", "--budget", "lots"])
    assert res.exit_code == 1 and "memory budget" in res.output


def test_run_cli_prints_text_and_stats(q8_bundle):
    import json

    res = CliRunner().invoke(cli, ["run", str(q8_bundle), "-p", "Hello", "-n", "4", "--budget", "2MiB", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["stats"]["budget_bytes"] == 2 * 2**20 and data["stats"]["tokens"] >= 4


@pytest.mark.parametrize("mode", _modes())
def test_manual_tiers(q8_bundle, mode):
    with Controller.open(q8_bundle, policy="uniform:Q2_K", mode=mode, lookahead=0) as ctl:
        q2 = logits(ctl.llama(n_ctx=64, n_threads=2, logits_all=True))
    with Controller.open(q8_bundle, policy="manual", mode=mode, lookahead=0) as ctl:
        llm = ctl.llama(n_ctx=64, n_threads=2, logits_all=True)
        base = logits(llm)
        ctl.set_tiers(np.zeros((len(ctl.moe_layers), ctl.index.n_expert), dtype=np.int16))  # all Q2_K
        assert np.array_equal(logits(llm), q2)
        ctl.set_tiers({})  # back to the base copy everywhere
        assert np.array_equal(logits(llm), base)
        if mode == "per-layer":
            with pytest.raises(RuntimeConfigError, match="one tier per layer"):
                ctl.set_tiers({(0, 0): "Q2_K"})


@pytest.mark.skipif("per-expert" not in _modes(), reason="needs the patched llama.cpp")
def test_one_expert_at_another_tier_changes_only_the_tokens_routed_to_it(bundle):
    """Per-expert views: with one expert of layer 0 at Q2_K, the logits of the tokens before the
    first one routed to it (with real weight) are bit-identical, and that token's are not."""
    out = bundle("qwen3moe", base_tier=Tier.Q8_0, n_layer=2, skew=0.5, seed=3)
    with Controller.open(out, policy="manual", mode="per-expert", lookahead=0) as ctl:
        llm = ctl.llama(n_ctx=64, n_threads=2, logits_all=True)
        ctl.trace = []
        base = logits(llm)  # the base copy everywhere: which tokens does layer 0 route to which expert?
        ids, w = ctl.trace[0].ids, ctl.trace[0].weights
        first_use = {}
        for e in np.unique(ids):
            rows = np.flatnonzero(((ids == e) & (w > 0.1)).any(axis=1))
            if len(rows) and not (ids[: rows[0]] == e).any():
                first_use[int(e)] = int(rows[0])
        expert, first = max(first_use.items(), key=lambda kv: kv[1])  # the expert first used latest
        assert 0 < first < len(PROMPT), first_use
        ctl.set_tiers({(ctl.moe_layers[0], expert): "Q2_K"})
        one = logits(llm)
    assert np.array_equal(one[:first], base[:first])  # causal: rows before it see no change
    assert not np.array_equal(one[first], base[first])  # the routed token's row does


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/io, /proc/self/maps: Linux")
def test_cold_start_reads_dense_weights_and_budget_only(bundle):
    """Patched build under a budget: opening reads the non-expert weights, one expert per layer for the
    warm-up decode and at most the budget (the pager's warming), not the base file's experts."""
    from dymoe_gguf._native import patch, vm
    from dymoe_gguf.bundle import BundleIndex

    if patch.load() is None:
        pytest.skip("needs the patched llama.cpp (no-populate)")
    out = bundle("qwen3moe", base_tier=Tier.Q4_K, n_layer=3, n_expert=64)
    idx = BundleIndex(out)
    experts = sum(t.nbytes for n, t in idx.base_tensors.items() if "_exps." in n)
    dense = sum(t.nbytes for n, t in idx.base_tensors.items() if "_exps." not in n)
    budget = 1 << 20  # holds the working set of a 4-token batch (8 experts), not of 64 tokens (all 64)
    for f in [idx.base_path, *idx.tier_paths.values()]:
        vm.drop_file_cache(str(f))
    with Controller.open(out, memory_budget=budget, policy="dymoe") as ctl:
        before = vm.read_bytes()
        llm = ctl.llama(n_ctx=64, n_batch=4, n_threads=2)
        read = vm.read_bytes() - before
        assert llm.eval(PROMPT) is None and ctl.stats().callback_error is None
    if read == 0:
        pytest.skip("/proc/self/io does not count reads here")
    one_expert_per_layer = 3 * experts // (3 * 64)
    assert read <= dense + one_expert_per_layer + budget + (256 << 10), (read, dense, experts)


def test_lookahead_prefetch_pauses_when_recall_is_poor(bundle):
    """Random routing is not predictable: prefetch switches itself off for those layers (and stays on
    when the floor is 0), while recall is still measured."""
    from dymoe_gguf.bundle import BundleIndex

    out = bundle("qwen3moe", base_tier=Tier.Q4_K, n_layer=3, n_expert=16, skew=0.0)
    budget = int(BundleIndex(out).expert_bytes()[..., 0].sum() * 0.5)  # experts come and go

    def decode(floor: float) -> tuple[dict, int, int]:
        with Controller.open(out, memory_budget=budget, policy="dymoe", lookahead=1,
                             lookahead_min_recall=floor) as ctl:
            llm = ctl.llama(n_ctx=256, n_threads=2)
            llm.reset()
            llm.eval(PROMPT)
            rng = np.random.default_rng(0)
            for i, tok in enumerate(rng.integers(0, 256, 60).tolist()):
                llm.eval([tok])
                if i == 39:
                    mid = ctl.pager.stats.prefetch_requests
            s = ctl.stats().to_dict()
            return s, mid, ctl.pager.stats.prefetch_requests

    s, mid, end = decode(0.95)
    assert s["lookahead_recall"] is not None and s["lookahead_recall"] < 0.9, s["lookahead_recall"]
    assert s["lookahead_prefetching"][1:] == [False, False], s["lookahead_recall_recent"]
    assert end == mid  # no prefetch requests in the last 20 tokens
    s, mid, end = decode(0.0)
    assert all(s["lookahead_prefetching"]) and end > mid
    with pytest.raises(RuntimeConfigError, match="lookahead_min_recall"):
        Controller.open(out, lookahead_min_recall=1.5)


def test_no_path_uses_llama_cpps_extra_buffer_types_unless_asked(q8_bundle, tmp_path):
    """AMX / CPU_REPACK copy experts out of the mapping and AMX crashes upstream on some Intel CPUs:
    every Llama the product builds has use_extra_bufts off, policy off (plain llama.cpp) included."""
    for policy in ("off", "dymoe", "observe"):
        with Controller.open(q8_bundle, policy=policy) as ctl:
            assert ctl.llama(n_ctx=64).model_params.use_extra_bufts is False, policy
    with Controller.open(q8_bundle, policy="off") as ctl:
        assert ctl.llama(n_ctx=64, repack=True).model_params.use_extra_bufts is True  # only when asked
    with pytest.raises(RuntimeConfigError, match="only policy 'off'"):
        Controller.open(q8_bundle, policy="dymoe").llama(n_ctx=64, repack=True)
    ref = open_llama(q8_bundle / "model.gguf", n_ctx=64)  # eval's reference model
    try:
        assert ref.model_params.use_extra_bufts is False
    finally:
        ref.close()
