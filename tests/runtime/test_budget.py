"""The memory budget is a contract: resident expert bytes — the sidecars' and the base file's, measured
with mincore on mappings of our own, not by the pager's bookkeeping — stay within 5 % of the budget
through a 512-token prompt and a 2,000-token generation, in both view modes, on the shipped model
and on an OLMoE-shaped synthetic one; and after the budget shrinks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dymoe_gguf import Controller
from dymoe_gguf._native import vm
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.bundle.format import DEFAULT_BASE_TIER, DEFAULT_TIERS, is_expert_tensor
from dymoe_gguf.errors import RuntimeConfigError

ROOT = Path(__file__).resolve().parents[2]
SLACK = 1.05


def _modes() -> list[str]:
    import llama_cpp  # noqa: F401

    from dymoe_gguf._native import patch

    return ["per-layer", "per-expert"] if patch.load() is not None else ["per-layer"]


class Residency:
    """Samples the page-cache residency of every expert byte range of a bundle in a thread."""

    def __init__(self, bundle: Path, every: float = 0.004) -> None:
        idx = BundleIndex(bundle)
        self.maps = []
        ranges = [(idx.base_path, [(t.offset, t.nbytes) for n, t in idx.base_tensors.items() if is_expert_tensor(n)])]
        for tier in idx.tiers:
            ranges.append((idx.tier_paths[tier], [
                (idx.slice(layer, m, e, tier).offset, idx.slice(layer, m, e, tier).nbytes)
                for layer in idx.moe_layers for m in ("gate", "up", "down") for e in range(idx.n_expert)]))
        for path, rs in ranges:
            m = vm.Mapping.open(str(path))
            self.maps.append((m, rs))
        self.every = every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for m, rs in self.maps:
            pages = m.residency()
            for off, n in rs:
                total += int(pages[off // vm.PAGE:(off + n + vm.PAGE - 1) // vm.PAGE].sum()) * vm.PAGE
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(self.now())

    def __enter__(self) -> Residency:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.now())
        for m, _rs in self.maps:
            m.close()


def _drop_cache(bundle: Path) -> None:
    idx = BundleIndex(bundle)
    for f in [idx.base_path, *idx.tier_paths.values()]:
        vm.drop_file_cache(str(f))


def _prompt(llm, n: int) -> list[int]:
    text = (ROOT / "data" / "heldout.txt").read_text(encoding="utf-8")
    toks = llm.tokenize(text.encode(), add_bos=True)
    assert len(toks) >= n
    return toks[:n]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    from dymoe_gguf.convert import convert

    out = tmp_path_factory.mktemp("shipped") / "tiny.dymoe"
    convert(ROOT / "models" / "tiny-moe", out, base_tier=DEFAULT_BASE_TIER, tiers=DEFAULT_TIERS, threads=2)
    return out


@pytest.fixture(scope="module")
def olmoe_shape(bundle) -> Path:
    """OLMoE's routing shape (64 experts, top-8) at a width small enough for a test."""
    return bundle("olmoe", base_tier=Tier.Q4_K, n_layer=3, n_expert=64, top_k=8, d=256, ff=256, skew=1.0)


def _q4k_expert_bytes(bundle: Path) -> int:
    idx = BundleIndex(bundle)
    return int(idx.expert_bytes()[..., idx.tiers.index(Tier.Q4_K)].sum())


def _cases() -> list[tuple[str, str, str]]:
    """(model, mode, hot path): both models in every mode with the runtime's default safe point (C for
    per-expert on a patched build, Python for per-layer), and per-expert with the Python one."""
    modes = _modes()
    return ([(m, mode, "auto") for m in ("shipped", "olmoe_shape") for mode in modes]
            + [("shipped", "per-expert", "python")] * ("per-expert" in modes))


@pytest.mark.slow
@pytest.mark.parametrize(("model", "mode", "hot"), _cases())
def test_budget_holds_through_prompt_and_generation(request, model, mode, hot):
    bundle = request.getfixturevalue(model)
    budget = _q4k_expert_bytes(bundle) // 2
    _drop_cache(bundle)
    with Controller.open(bundle, memory_budget=budget, policy="dymoe", mode=mode, hot_path=hot) as ctl:
        llm = ctl.llama(n_ctx=2560, n_batch=512, n_threads=2)
        prompt = _prompt(llm, 512)
        with Residency(bundle) as prompt_phase:
            llm.eval(prompt)
        with Residency(bundle) as decode_phase:
            for _ in range(2000):
                llm.eval([llm.sample(temp=0.0)])
        s = ctl.stats()
    assert s.callback_error is None and s.mode == mode and s.tokens >= 2512
    assert s.hot_path == ("native" if hot == "auto" and mode == "per-expert" else "python")
    assert s.pager["evictions"] > 0  # the budget really bound
    worst = max(prompt_phase.samples), max(decode_phase.samples)
    assert len(prompt_phase.samples) > 5 and len(decode_phase.samples) > 100
    print(f"\nbudget {model} {mode} {s.hot_path}: max resident / budget, prompt {worst[0] / budget:.3f}, "
          f"decode {worst[1] / budget:.3f} ({len(prompt_phase.samples)}/{len(decode_phase.samples)} samples)")
    assert max(worst) <= SLACK * budget, (model, mode, [round(w / budget, 3) for w in worst])


@pytest.mark.parametrize("mode", _modes())
def test_a_shrinking_budget_is_held_after_the_replan(shipped, mode):
    budget = _q4k_expert_bytes(shipped)
    _drop_cache(shipped)
    with Controller.open(shipped, memory_budget=budget, policy="dymoe", mode=mode) as ctl:
        llm = ctl.llama(n_ctx=1024, n_batch=256, n_threads=2)
        llm.eval(_prompt(llm, 256))
        for _ in range(64):
            llm.eval([llm.sample(temp=0.0)])
        smaller = budget // 3
        ctl.set_budget(smaller)
        assert ctl.stats().budget_bytes == smaller
        with Residency(shipped) as after:
            for _ in range(200):
                llm.eval([llm.sample(temp=0.0)])
        assert ctl.stats().callback_error is None
    assert max(after.samples) <= SLACK * smaller, [round(x / smaller, 3) for x in sorted(after.samples)[-3:]]


def test_a_budget_below_the_working_set_is_refused_naming_the_minimum(shipped):
    idx = BundleIndex(shipped)
    one_layer_lowest = int(idx.expert_bytes()[idx.moe_layers[0], :, 0].sum())
    with Controller.open(shipped, memory_budget=one_layer_lowest // 4) as ctl:
        with pytest.raises(RuntimeConfigError, match=r"below the minimum .* \d"):
            ctl.llama(n_ctx=256, n_batch=256)
    with Controller.open(shipped, memory_budget=4 * one_layer_lowest) as ctl:
        ctl.llama(n_ctx=256, n_batch=256)
        with pytest.raises(RuntimeConfigError, match="minimum"):
            ctl.set_budget(1)
        assert ctl.stats().budget_bytes == 4 * one_layer_lowest


def test_base_experts_stay_out_of_memory_after_a_prompt(shipped):
    """The base file's experts are never read behind the pager's back (the defect: a prompt batch
    faulted them in through read-around of neighbouring pages and they were never evicted)."""
    idx = BundleIndex(shipped)
    budget = _q4k_expert_bytes(shipped) // 2
    _drop_cache(shipped)
    with Controller.open(shipped, memory_budget=budget, policy="dymoe") as ctl:
        llm = ctl.llama(n_ctx=512, n_batch=256, n_threads=2)
        llm.eval(_prompt(llm, 200))
        dropped = ctl.stats().pager["base_dropped_bytes"]  # the pager's safety net found nothing to drop
        base = vm.Mapping.open(str(idx.base_path))
        try:
            pages = base.residency()
            resident = sum(int(pages[t.offset // vm.PAGE:(t.offset + t.nbytes) // vm.PAGE].sum())
                           for n, t in idx.base_tensors.items() if is_expert_tensor(n)) * vm.PAGE
        finally:
            base.close()
    assert resident <= 0.05 * budget and dropped == 0, (resident, dropped, budget)


def test_budget_auto_is_available_ram_minus_dense_kv_and_margin(shipped):
    import psutil

    from dymoe_gguf.bundle import memory

    with Controller.open(shipped, memory_budget="auto") as ctl:
        ctl.llama(n_ctx=1024, n_batch=256)
        budget = ctl.stats().budget_bytes
    idx = BundleIndex(shipped)
    spare = psutil.virtual_memory().available - memory.dense_bytes(idx) - memory.kv_cache_bytes(idx, 1024)
    assert memory.working_set_bytes(idx, 256) <= budget <= spare
    assert budget >= 0.6 * spare  # the margin is stated, not most of the RAM
