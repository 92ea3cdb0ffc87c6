"""Loading: the ``Llama`` for a bundle, its cold start, and the discovery of its weight tensors.

A controlled model is loaded with mmap on, repack off and the eval callback installed. On a patched
build under a budget it is also a *cold start*: the base file is mapped without the load-time
populate (``DYMOE_NO_POPULATE``), so opening reads its metadata and dense weights, not its experts:

1. before llama.cpp parses the file, its metadata is read through a descriptor without read-ahead
   (llama.cpp's buffered reads would start the device's read-ahead, which runs on into the experts);
2. after loading, fault read-around is switched off on the whole mapping (one fault would read
   megabytes of experts no view will ever read: :func:`no_read_around`) and the dense weights, plus
   expert 0 of every layer, are read in bulk;
3. the warm-up decode, which discovers the weight tensors in the graph, routes every slot to
   expert 0, so it reads nothing else.

Without a cold start the dense weights are brought in after the warm-up (:func:`populate_dense`).
Step 2 needs the address of llama.cpp's mapping before the warm-up: from ``/proc/self/maps``, or
where the platform has none (macOS) from the first weight tensor the warm-up's graph names, before
anything is computed (:class:`~dymoe_gguf._native.mapped_base.FirstWeight`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from dymoe_gguf._native import hot, vm
from dymoe_gguf._native.llama import make_eval_callback, open_llama
from dymoe_gguf._native.mapped_base import FirstWeight
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import MATRICES, is_expert_tensor, parse_tier, tier_bits
from dymoe_gguf.errors import DymoeError, RuntimeConfigError
from dymoe_gguf.runtime import decide
from dymoe_gguf.runtime.config import Mode, Policy, RuntimeConfig, resolve_pins
from dymoe_gguf.runtime.observe import Discovered, Observer, weight_matrix
from dymoe_gguf.runtime.pager import Pager
from dymoe_gguf.runtime.views import Views

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A loaded, discovered model."""

    llm: Any  # llama_cpp.Llama
    callback: Any  # the callback object llama.cpp holds: must outlive llm
    discovered: Discovered
    k: int  # experts selected per token
    cold_start: bool  # whether the no-populate cold start ran (dense weights already read)
    forward: Any = None  # patched builds: what the C eval callback forwards to (fn None: nothing)
    hot_lib: Any = None  # patched builds with the C hot path: libggml-cpu


def read_header(index: BundleIndex) -> None:
    """Bring the base file's metadata (everything before the first tensor) into the page cache."""
    end = min((t.offset for t in index.base_tensors.values()), default=0)
    vm.read_file_ranges(str(index.base_path), [(0, end)])


def prepare_cold_start(index: BundleIndex, addr: int | None = None) -> bool:
    """After a no-populate load, before the warm-up decode: read the dense weights and expert 0 of
    every layer in bulk, and switch off fault read-ahead on the experts. ``addr``: where llama.cpp
    mapped the base file's offset 0, found in /proc/self/maps when not given; False where it
    cannot be found."""
    if addr is None:
        # llama.cpp maps the whole file once and unmaps the header's pages after loading: the
        # mapping that remains starts at a file offset > 0
        starts = {a - off for a, _n, off in vm.file_mappings(str(index.base_path))}
        if len(starts) != 1:
            return False
        addr = starts.pop()
    experts = [t for name, t in index.base_tensors.items() if is_expert_tensor(name)]
    dense = [(t.offset, t.nbytes) for name, t in index.base_tensors.items() if not is_expert_tensor(name)]
    first = [(t.offset, t.nbytes // index.n_expert) for t in experts]  # expert 0's slice of each tensor
    no_read_around(index, addr)
    vm.read_file_ranges(str(index.base_path), dense + first)
    return True


def no_read_around(index: BundleIndex, mapped_base: int) -> None:
    """``MADV_RANDOM`` on every tensor of llama.cpp's mapping of the base file. A page fault then
    reads that page only: with the kernel's read-around (up to read_ahead_kb, 8 MiB here), one
    fault in a dense tensor would read the neighbouring experts into the page cache, where no view
    reads them and no budget counts them. Dense weights are read in bulk beforehand, so their
    faults are minor ones."""
    base = vm.Mapping.borrow(index.base_path, mapped_base)
    try:
        for t in index.base_tensors.values():
            base.advise(t.offset, t.nbytes, vm.MADV_RANDOM)
    finally:
        base.close()


def populate_dense(index: BundleIndex, mapped_base: int) -> None:
    """Read the base file's non-expert tensors into memory (they are read every token)."""
    base = vm.Mapping.borrow(index.base_path, mapped_base)
    try:
        for name, t in index.base_tensors.items():
            if not is_expert_tensor(name):
                base.populate(t.offset, t.nbytes)
    finally:
        base.close()


def load(index: BundleIndex, observer: Observer, *, no_populate: bool, llama_kwargs: dict[str, Any]) -> Loaded:
    """Load the base model with ``observer`` as eval callback and run the warm-up decode (which,
    after a cold start, reads only expert 0 of each layer: already read in bulk)."""
    finder = None
    if no_populate and not vm.capabilities().proc_self_maps:
        offsets = {name: t.offset for name, t in index.base_tensors.items()}
        finder = FirstWeight(observer, offsets, lambda base: prepare_cold_start(index, base))
    callback = make_eval_callback(finder or observer)
    cb_eval, forward, lib = callback, None, hot_library()
    if lib is not None:  # the patch's C callback, forwarding to Python until the C hot path takes over
        cb_eval, forward = hot.forwarding_callback(lib, callback)
    if no_populate:
        read_header(index)
    llm = open_llama(index.base_path, cb_eval=cb_eval, cb_user_data=forward, no_populate=no_populate,
                     guard=observer.guard, **llama_kwargs)
    try:
        cold = no_populate and (finder is not None or prepare_cold_start(index))
        observer.warmup_expert = 0 if cold else None
        bos = llm.token_bos()
        llm.eval([bos if bos >= 0 else 0])  # discovery: the graph's weight tensors
        llm.reset()
        if finder is not None:
            cold = finder.base is not None
        if observer.error is not None:
            raise DymoeError(f"eval callback failed: {observer.error}")
        if not observer.ready:
            raise RuntimeConfigError("Could not find the expert tensors in llama.cpp's graph "
                                     "(is this a dymoe-gguf bundle of a supported architecture?)")
        if observer.k <= 0:
            raise RuntimeConfigError("The warm-up decode selected no experts")
    except BaseException:
        llm.close()
        raise
    return Loaded(llm, (callback, cb_eval), observer.discovered, observer.k, cold, forward, lib)


def hot_library() -> Any:
    """libggml-cpu when this build has the patch's C hot path (patches/0003), else None."""
    from dymoe_gguf._native import patch

    views = patch.load()
    return views.lib if views is not None and views.version >= hot.HOT_VERSION else None


def load_patch(mode: Mode):
    """The per-expert views API of a patched build, None on a stock build or in per-layer mode."""
    from dymoe_gguf._native import patch

    views = patch.load()
    if mode is Mode.PER_EXPERT and views is None:
        raise RuntimeConfigError("Per-expert mode needs the patched llama.cpp (see patches/); "
                                 "this build is stock: use --mode per-layer or auto")
    return views if mode is not Mode.PER_LAYER else None


def initial_importance(index: BundleIndex, k: int, half_life: float) -> decide.ImportanceTracker:
    """An importance tracker for the MoE layers, seeded from ``calibration.gguf`` when there is one."""
    from dymoe_gguf.quality.profile import load_profile

    moe = list(index.moe_layers)
    tracker = decide.ImportanceTracker(len(moe), index.n_expert, k, decide.ImportanceConfig(half_life_tokens=half_life))
    prof = load_profile(index)
    if prof is not None:
        tracker.seed(decide.ImportanceProfile(prof.freq[moe], prof.mass[moe]))
    return tracker


def predictor(index: BundleIndex, d: Discovered, k: int) -> decide.Predictor | None:
    """Look-ahead's predictor from the routers and FFN norms found in the graph (F32 routers only)."""
    try:
        routers = {mi: weight_matrix(d.routers[layer]) for mi, layer in enumerate(index.moe_layers)}
        norms = {mi: weight_matrix(d.ffn_norms[layer]) for mi, layer in enumerate(index.moe_layers)
                 if layer in d.ffn_norms}
    except ValueError:
        log.warning("router weights are not F32: look-ahead disabled")
        return None
    return decide.Predictor(routers, norms, k)


def planner(index: BundleIndex, cfg: RuntimeConfig, importance: decide.ImportanceTracker, *,
            per_layer: bool) -> decide.Planner:
    """The planner for ``cfg``'s policy over the MoE layers' expert sizes."""
    uniform = index.tiers.index(parse_tier(cfg.uniform_tier)) if cfg.uniform_tier else None
    schedule = decide.DepthSchedule(cfg.depth, r_max=cfg.r_max, r_min=cfg.r_min, pins=resolve_pins(cfg, index))
    cost = decide.CostModel(tuple(tier_bits(t) for t in index.tiers), prefer=decide.parse_prefer(cfg.prefer))
    return decide.Planner(expert_memory(index)[list(index.moe_layers)], importance, schedule, budget=cfg.budget,
                          per_layer=per_layer, uniform_tier=uniform, manual=cfg.policy is Policy.MANUAL,
                          alloc=decide.AllocationConfig(promote_margin=cfg.promote_margin), cost=cost)


def expert_memory(index: BundleIndex) -> np.ndarray:
    """``[n_layer, n_expert, n_tiers]`` memory one expert copy takes: the whole pages of its three
    matrices (what the pager charges to the budget; ``index.expert_bytes()`` counts bytes)."""
    out = np.zeros((index.n_layer, index.n_expert, len(index.tiers)), dtype=np.int64)
    for layer in index.moe_layers:
        for t, tier in enumerate(index.tiers):
            for m in MATRICES:
                for e in range(index.n_expert):
                    s = index.slice(layer, m, e, tier)
                    out[layer, e, t] += vm.span(s.offset, s.nbytes)
    return out


def apply_side(index: BundleIndex, cfg: RuntimeConfig, loaded: Loaded, patch: Any) -> tuple[dict, Views, Pager]:
    """The sidecar mappings, the views bound to the discovered expert tensors and the pager; the
    base file's dense weights brought in (when the load did not) and its read-around switched off."""
    if vm.PAGE > index.alignment:
        log.warning("pages here are %d bytes, the bundle is %d-byte aligned: experts share pages, so an "
                    "eviction drops neighbours too and residency is over-counted", vm.PAGE, index.alignment)
    mappings = {i: vm.Mapping.open(str(index.tier_paths[tier])) for i, tier in enumerate(index.tiers)}
    views = Views(index, mappings, patch)
    views.bind(loaded.discovered.experts)
    base = views.mapped_base()
    pager = Pager(index, mappings, cfg.budget, base, drop_base=cfg.policy is not Policy.MANUAL)
    if patch is not None and cfg.budget is not None and not loaded.cold_start:
        populate_dense(index, base)  # read every token: in bulk now
    no_read_around(index, base)
    return mappings, views, pager
