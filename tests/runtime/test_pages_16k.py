"""The pager on 16 KiB pages (Pi 5's default kernel, Apple Silicon), simulated on this 4 KiB kernel.

Under ``vm.simulated_page_size(16384)`` every range the runtime hands the kernel is rounded as a
16 KiB kernel would round it, and mincore answers per 16 KiB page. The files, mappings, reads and
evictions are real; what a 16 KiB kernel would hold is checked against the ground truth at this
kernel's own pages (a fresh mapping outside the simulation): every 4 KiB page of a resident 16 KiB
page is resident, and nothing of an evicted one.
"""

from __future__ import annotations

import numpy as np
import pytest

from dymoe_gguf import Controller
from dymoe_gguf._native import vm
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.bundle.format import MATRICES, is_expert_tensor
from dymoe_gguf.runtime.pager import Pager

P16 = 16384
pytestmark = pytest.mark.skipif(vm.SYSTEM_PAGE > P16, reason="simulates 16 KiB pages on a kernel with smaller ones")


def _spans(ranges: list[tuple[int, int]], page: int) -> list[tuple[int, int]]:
    """[first page, end page) covering each (offset, length), in ``page`` units, sorted."""
    return sorted((off // page, -(-(off + n) // page)) for off, n in ranges)


def _disjoint(spans: list[tuple[int, int]]) -> bool:
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _expert_ranges(idx: BundleIndex, layer: int, e: int, tier: Tier) -> list[tuple[int, int]]:
    return [(idx.slice(layer, m, e, tier).offset, idx.slice(layer, m, e, tier).nbytes) for m in MATRICES]


def _tier_ranges(idx: BundleIndex, tier: Tier) -> list[tuple[int, int]]:
    return [r for layer in idx.moe_layers for e in range(idx.n_expert) for r in _expert_ranges(idx, layer, e, tier)]


def _truth(path, ranges: list[tuple[int, int]], page: int = P16) -> list[tuple[int, int]]:
    """(resident, total) system pages inside the ``page``-rounded span of each range: the ground
    truth, read at this kernel's page size on a mapping of our own (outside any simulation)."""
    assert vm.page_size() == vm.SYSTEM_PAGE
    m = vm.Mapping.open(str(path))
    try:
        res = m.residency()
    finally:
        m.close()
    out = []
    for a, b in _spans(ranges, page):
        lo, hi = a * page // vm.SYSTEM_PAGE, b * page // vm.SYSTEM_PAGE
        out.append((int(res[lo:hi].sum()), hi - lo))
    return out


def _cold(idx: BundleIndex) -> None:
    for f in [idx.base_path, *idx.tier_paths.values()]:
        vm.drop_file_cache(str(f))


@pytest.fixture(scope="module")
def idx(shipped_bundle) -> BundleIndex:
    return BundleIndex(shipped_bundle)


def test_no_expert_shares_a_16k_page(idx):
    """Bundles are 16 KiB aligned: at 16 KiB pages every expert copy's pages are its own (in each
    sidecar), and the base file's experts share no page with its dense weights."""
    assert idx.alignment % P16 == 0
    for tier in idx.tiers:
        ranges = _tier_ranges(idx, tier)
        assert _disjoint(_spans(ranges, P16)), tier
        assert not _disjoint(_spans(ranges, 4 * idx.alignment)), "the check must be able to fail"
    base = [(t.offset, t.nbytes) for t in idx.base_tensors.values()]
    assert _disjoint(_spans(base, P16))
    # and with 16 KiB rounding no expert's eviction range reaches into its neighbour's first page
    e0 = _expert_ranges(idx, idx.moe_layers[0], 0, idx.tiers[0])[0]
    e1 = _expert_ranges(idx, idx.moe_layers[0], 1, idx.tiers[0])[0]
    with vm.simulated_page_size(P16):
        assert e0[0] + vm.span(*e0) <= e1[0]


def test_pager_reads_accounts_and_measures_whole_16k_pages(idx):
    """An expert read by the pager costs its whole 16 KiB pages: that is what the pager charges to
    the budget, what its mincore measurement reports and what the kernel (ground truth) holds."""
    layer, tier = idx.moe_layers[0], idx.tiers.index(Tier.Q4_K)
    experts = np.array([0, 3])
    _cold(idx)
    with vm.simulated_page_size(P16):
        mappings = {i: vm.Mapping.open(str(idx.tier_paths[t])) for i, t in enumerate(idx.tiers)}
        pager = Pager(idx, mappings, budget=None)
        try:
            pager.use(layer, experts, np.full(2, tier))
            per, _base = pager.residency()
            measured_total = pager.sync()
            want = {e: sum(vm.span(o, n) for o, n in _expert_ranges(idx, layer, e, Tier.Q4_K)) for e in experts}
            for e in experts.tolist():
                assert want[e] % P16 == 0 and want[e] > idx.expert_bytes()[layer, e, tier]  # not a multiple
                assert pager.full[layer, e, tier] == want[e]  # charged
                assert per[layer, e, tier] == want[e]  # measured
            assert measured_total == pager.total == sum(want.values())
        finally:
            pager.stop()
            for m in mappings.values():
                m.close()
    path = idx.tier_paths[Tier.Q4_K]
    for e in range(idx.n_expert):
        truth = _truth(path, _expert_ranges(idx, layer, e, Tier.Q4_K))
        if e in experts:
            assert all(r == n for r, n in truth), (e, truth)  # whole 16 KiB pages read, padding included
        else:
            assert all(r == 0 for r, _n in truth), (e, truth)  # and nothing around them


def test_budget_and_eviction_in_16k_pages(idx):
    """A budget of four experts' *bytes* does not hold four experts' 16 KiB pages: the pager evicts
    the least recently used one — its whole pages, and none of its neighbours' — and the kernel
    then holds no more than the budget."""
    layer, tier = idx.moe_layers[1], idx.tiers.index(Tier.Q4_K)
    raw = int(idx.expert_bytes()[layer, 0, tier])
    budget = 4 * raw
    _cold(idx)
    with vm.simulated_page_size(P16):
        mappings = {i: vm.Mapping.open(str(idx.tier_paths[t])) for i, t in enumerate(idx.tiers)}
        pager = Pager(idx, mappings, budget=budget)
        try:
            assert 4 * pager.full[layer, 0, tier] > budget
            for e in range(4):
                pager.new_step()
                pager.use(layer, np.array([e]), np.array([tier]))
            measured = pager.sync()
            assert pager.stats.evictions >= 1 and measured <= budget, (measured, budget)
            per, _ = pager.residency()
            assert per[layer, 0, tier] == 0 and (per[layer, 1:4, tier] == pager.full[layer, 1:4, tier]).all()
        finally:
            pager.stop()
            for m in mappings.values():
                m.close()
    path = idx.tier_paths[Tier.Q4_K]
    assert all(r == 0 for r, _n in _truth(path, _expert_ranges(idx, layer, 0, Tier.Q4_K)))
    for e in (1, 2, 3):  # expert 1's first page is expert 0's neighbour
        assert all(r == n for r, n in _truth(path, _expert_ranges(idx, layer, e, Tier.Q4_K))), e


def test_controller_holds_a_budget_counted_in_16k_pages(shipped_bundle, idx):
    """The controller end to end on simulated 16 KiB pages: cold start, decode under a budget, and
    resident expert pages (sidecars and the base file's experts, per 16 KiB page) within it."""
    budget = int(idx.expert_bytes()[..., idx.tiers.index(Tier.Q4_K)].sum()) // 2
    _cold(idx)
    samples = []
    with vm.simulated_page_size(P16):
        with Controller.open(shipped_bundle, memory_budget=budget, policy="dymoe") as ctl:
            llm = ctl.llama(n_ctx=512, n_batch=64, n_threads=2)
            llm.eval(llm.tokenize(b"The history of the river valley", add_bos=True))
            for _ in range(150):
                llm.eval([llm.sample(temp=0.0)])
                if len(samples) < 150 and _ % 10 == 0:
                    samples.append(_resident(idx))
            s = ctl.stats()
            assert ctl._loaded.cold_start == (ctl.patch is not None)
            # the planner budgets with what the pager charges: whole 16 KiB pages
            moe = list(idx.moe_layers)
            full = ctl.pager.full[moe]
            assert np.array_equal(ctl.step.planner.sizes, full)
            kept = ctl.step.planner.kept
            li, ei = np.nonzero(kept >= 0)
            assert full[li, ei, kept[li, ei]].sum() <= budget
    assert s.callback_error is None and s.pager["evictions"] > 0
    assert s.resident_expert_bytes % P16 == 0
    assert max(samples) <= 1.05 * budget, [round(x / budget, 3) for x in samples]


def _resident(idx: BundleIndex) -> int:
    """Expert bytes resident now, counted in vm's (simulated) pages, on mappings of our own."""
    total = 0
    files = [(idx.base_path, [(t.offset, t.nbytes) for n, t in idx.base_tensors.items() if is_expert_tensor(n)])]
    files += [(idx.tier_paths[t], _tier_ranges(idx, t)) for t in idx.tiers]
    for path, ranges in files:
        m = vm.Mapping.open(str(path))
        try:
            total += sum(int(m.pages(o, n).sum()) for o, n in ranges) * vm.PAGE
        finally:
            m.close()
    return total
