"""The controller with platform calls missing, forced on Linux: the cold start without
/proc/self/maps (macOS), and a whole run with macOS's set of calls."""

from __future__ import annotations

import sys

import pytest

from dymoe_gguf import Controller
from dymoe_gguf._native import platform, vm
from dymoe_gguf.bundle import BundleIndex, Tier

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forces the fallbacks on Linux")
PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33]
MACOS = ("posix_fadvise", "madv_pageout", "madv_cold", "madv_populate_read", "proc_self_io", "psutil_io",
         "proc_self_maps")  # what macOS lacks of the calls this Linux has


def _patched() -> bool:
    import llama_cpp  # noqa: F401

    from dymoe_gguf._native import patch

    return patch.load() is not None


def _cold(idx: BundleIndex) -> None:
    for f in [idx.base_path, *idx.tier_paths.values()]:
        vm.drop_file_cache(str(f))


def test_cold_start_without_proc_self_maps(bundle):
    """No /proc/self/maps: llama.cpp's mapping is found from the first weight the warm-up's graph
    names, before anything is computed, and opening still reads only the dense weights, one expert
    per layer and what the budget allows — the bound of the /proc/self/maps path
    (tests/runtime/test_controller.py), where a warm-up without the cold start reads the experts
    around every fault."""
    if not _patched():
        pytest.skip("needs the patched llama.cpp (no-populate)")
    out = bundle("qwen3moe", base_tier=Tier.Q4_K, n_layer=3, n_expert=64)
    idx = BundleIndex(out)
    experts = sum(t.nbytes for n, t in idx.base_tensors.items() if "_exps." in n)
    dense = sum(t.nbytes for n, t in idx.base_tensors.items() if "_exps." not in n)
    budget = 1 << 20
    _cold(idx)
    with platform.without("proc_self_maps"):
        with Controller.open(out, memory_budget=budget, policy="dymoe") as ctl:
            before = vm.read_bytes()
            llm = ctl.llama(n_ctx=64, n_batch=4, n_threads=2)
            read = vm.read_bytes() - before
            assert ctl._loaded.cold_start
            assert llm.eval(PROMPT) is None and ctl.stats().callback_error is None
    if read == 0:
        pytest.skip("/proc/self/io does not count reads here")
    one_expert_per_layer = experts // 64
    assert read <= dense + one_expert_per_layer + budget + (256 << 10), (read, dense, experts)


def test_a_run_with_macos_calls(shipped_bundle):
    """With only the calls macOS has (no posix_fadvise, MADV_PAGEOUT/COLD/POPULATE_READ,
    /proc/self/io, psutil io counters or /proc/self/maps) the controller cold-starts, decodes the
    same tokens under a budget as with every call, evicts, and reports bytes read as unknown.
    Whether the evicted pages leave the page cache is not checked: Linux ignores msync's
    MS_INVALIDATE, macOS's way to drop them."""
    idx = BundleIndex(shipped_bundle)
    budget = int(idx.expert_bytes()[..., idx.tiers.index(Tier.Q4_K)].sum()) // 2

    def generate() -> tuple[list[int], object, bool]:
        _cold(idx)
        with Controller.open(shipped_bundle, memory_budget=budget, policy="dymoe") as ctl:
            llm = ctl.llama(n_ctx=256, n_batch=64, n_threads=2)
            llm.eval(PROMPT)
            toks = []
            for _ in range(48):
                toks.append(llm.sample(temp=0.0))
                llm.eval([toks[-1]])
            return toks, ctl.stats(), ctl._loaded.cold_start

    with platform.without(*MACOS):
        toks, s, cold = generate()
    ref, s_ref, cold_ref = generate()
    assert toks == ref
    assert s.callback_error is None and s.pager["evictions"] > 0
    assert s.bytes_read is None and s.to_dict()["bytes_read"] is None
    assert isinstance(s_ref.bytes_read, int)
    assert cold == cold_ref == _patched()
