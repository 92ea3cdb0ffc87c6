"""The controller: attaches to a ``llama_cpp.Llama`` and runs observe -> decide -> apply.

    with Controller.open("model.dymoe", memory_budget="2GiB", policy="dymoe") as ctl:
        llm = ctl.llama(n_ctx=2048, n_threads=4)   # a normal llama_cpp.Llama
        print(llm.create_completion("The history of", max_tokens=64)["choices"][0]["text"])
        print(ctl.stats().to_dict())

Per token and MoE layer (inside llama.cpp's eval callback, before the layer's expert matmuls):
record the routing, update importance, check last layer's look-ahead, point the layer's expert
tensors at the tier the plan gives (per layer on stock llama.cpp, per expert with the patch),
optionally skip low-weight slots, and ask the pager to prefetch the experts predicted for the next
layers. Every ``reallocate_every`` tokens the allocator re-plans tiers under the budget.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dymoe_gguf._native import vm
from dymoe_gguf._native.llama import make_eval_callback, open_llama
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import base_expert_name, is_expert_tensor, parse_tier
from dymoe_gguf.errors import DymoeError, RuntimeConfigError
from dymoe_gguf.runtime import decide
from dymoe_gguf.runtime.config import RuntimeConfig, make_config
from dymoe_gguf.runtime.observe import Observer, read_f32, read_topk, weight_matrix
from dymoe_gguf.runtime.pager import Pager
from dymoe_gguf.runtime.stats import ControllerStats, StatsCounter
from dymoe_gguf.runtime.views import BASE, Views

log = logging.getLogger(__name__)
_NORMALISED = {"llama", "qwen3moe"}  # archs whose top-k weights llama.cpp renormalises (norm_w)


class Controller:
    """Decides and applies expert tiers for one bundle and the one ``Llama`` made from it."""

    def __init__(self, index: BundleIndex, cfg: RuntimeConfig) -> None:
        self.index = index
        self.cfg = cfg
        self.moe_layers = index.moe_layers
        self._mi = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.n_tiers = len(index.tiers)
        self.sizes = index.expert_bytes()[list(self.moe_layers)]  # [Lm, E, T]
        self._closed = False
        self._llm: Any = None
        self._cb: Any = None
        self._mappings: dict[int, vm.Mapping] = {}
        self._lock = threading.Lock()
        self.patch = self._load_patch(cfg.mode) if cfg.policy != "off" else None
        self.views: Views | None = None
        self.pager: Pager | None = None
        self.counter = StatsCounter(len(self.moe_layers), self.cfg.lookahead)
        self.k = 0
        self._norm_w = index.arch in _NORMALISED
        self.importance = decide.ImportanceTracker(len(self.moe_layers), index.n_expert, 1,
                                                   decide.ImportanceConfig(half_life_tokens=cfg.half_life))
        self.schedule = decide.DepthSchedule(cfg.depth, r_max=cfg.r_max, r_min=cfg.r_min, pins=self._pins())
        self.assignment: decide.Assignment | None = None
        self.skip = decide.SkipConfig(threshold=cfg.skip_threshold) if cfg.skip_threshold > 0 else None
        self._step: list[tuple[int, np.ndarray, np.ndarray]] = []  # this token's routing per MoE layer
        self._pred: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._skip_w: dict[int, np.ndarray] = {}
        self._routers: dict[int, np.ndarray] = {}
        self._la: dict[int, np.ndarray] = {}  # look-ahead: router x norm weight, [d, E]
        self._vt = np.zeros((len(self.moe_layers), index.n_expert), dtype=np.int64)  # view tier per expert
        self._norms: dict[int, np.ndarray] = {}
        self._tokens_since_alloc = 0
        # when a list: (moe layer, ids, weights, probs, ffn input or None) per layer and step (calibrate, tests)
        self.trace: list[tuple] | None = None
        # extra eval-callback handlers by node kind (e.g. "ffn_norm": fn(layer, ptr)), set before llama()
        self.extra_handlers: dict = {}
        self.routing_hooks: list = []  # fn(layer, ids [n_tokens, k]) after each layer's routing is recorded
        self._live = False  # set once attached: the warm-up decode only discovers tensors
        self._manual: np.ndarray | None = None  # policy manual: tier per (MoE layer, expert), BASE allowed
        self._warmup_expert: int | None = None  # cold start: the warm-up decode routes every slot here

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, bundle: str | Path, memory_budget: str | int | None = None, policy: str = "dymoe",
             **options: Any) -> Controller:
        """Open a bundle; ``options`` are :class:`RuntimeConfig` fields (lookahead, skip_threshold, …)."""
        cfg = make_config(policy, memory_budget, **options)
        index = BundleIndex(Path(bundle))
        if cfg.uniform_tier is not None:
            tier = parse_tier(cfg.uniform_tier)
            if tier not in index.tiers:
                raise RuntimeConfigError(f"Tier {tier.name} is not in this bundle (tiers: "
                                         f"{', '.join(t.name for t in index.tiers)})")
        return cls(index, cfg)

    def _pins(self) -> dict[int, int]:
        pins = {}
        for layer, name in self.cfg.pins.items():
            if layer not in self._mi:
                raise RuntimeConfigError(f"Cannot pin layer {layer}: MoE layers are {list(self.moe_layers)}")
            if str(name).lower() == "none":
                pins[self._mi[layer]] = decide.NOT_RESIDENT
            else:
                tier = parse_tier(str(name))
                if tier not in self.index.tiers:
                    raise RuntimeConfigError(f"Cannot pin layer {layer} to {tier.name}: not a tier of this bundle")
                pins[self._mi[layer]] = self.index.tiers.index(tier)
        return pins

    def _load_patch(self, mode: str):
        from dymoe_gguf._native import patch

        views = patch.load()
        if mode == "per-expert" and views is None:
            raise RuntimeConfigError("Per-expert mode needs the patched llama.cpp (see patches/); "
                                     "this build is stock: use --mode per-layer or auto")
        return views if mode != "per-layer" else None

    @property
    def mode(self) -> str:
        return "per-expert" if self.patch is not None else "per-layer"

    def llama(self, **kwargs: Any) -> Any:
        """The ``llama_cpp.Llama`` for this bundle (mmap on, repack off, eval callback set)."""
        if self._closed:
            raise RuntimeConfigError("This controller is closed")
        if self._llm is not None:
            raise RuntimeConfigError("Controller.llama() was already called: one Llama per controller")
        repack = kwargs.pop("repack", self.cfg.policy == "off")  # off: llama.cpp's own default (repack on)
        if self.cfg.policy == "off":
            self._llm = open_llama(self.index.base_path, repack=repack, **kwargs)
            return self._llm
        if repack:
            raise RuntimeConfigError("Repack copies experts into anonymous memory: only policy 'off' can use it")
        # patched build under a budget: do not read the whole base file at load
        no_populate = self.patch is not None and self.cfg.budget is not None
        extra = dict(self.extra_handlers)
        if self.cfg.lookahead > 0 and self.cfg.policy != "observe":
            extra.setdefault("l_out", self._on_layer_out)
        obs = Observer(self.moe_layers, on_topk=self._on_topk, on_weights=self._on_weights if self.skip else None,
                       peek=("ffn_moe_probs", "ffn_inp") if self.cfg.lookahead > 0 else ("ffn_moe_probs",),
                       extra=extra)
        self.observer = obs
        self._cb = make_eval_callback(obs)
        if no_populate:
            self._read_header()
        llm = open_llama(self.index.base_path, cb_eval=self._cb, no_populate=no_populate, **kwargs)
        self._llm = llm
        try:
            cold = self._prepare_cold_start() if no_populate else False
            self._attach(llm, populate_dense=no_populate and not cold)
        except BaseException:
            self.close()
            raise
        return llm

    def _populate_dense(self) -> None:
        """Read the base file's non-expert tensors into the page cache (after a no-populate load)."""
        assert self.views is not None
        key, st = next(iter(self.views._orig.items()))  # noqa: SLF001 - same package
        mapped = st.data - self.index.base_tensors[base_expert_name(*key)].offset
        for name, t in self.index.base_tensors.items():
            if not is_expert_tensor(name):
                if vm.madvise(mapped + t.offset, t.nbytes, vm.MADV_POPULATE_READ) != 0:
                    vm.madvise(mapped + t.offset, t.nbytes, vm.MADV_WILLNEED)

    def _read_header(self) -> None:
        """Bring the base file's metadata in before llama.cpp parses it: its buffered reads would
        otherwise start the device's read-ahead (8 MiB here), which runs on into the experts."""
        end = min((t.offset for t in self.index.base_tensors.values()), default=0)
        vm.read_file_ranges(str(self.index.base_path), [(0, end)])

    def _prepare_cold_start(self) -> bool:
        """After a no-populate load, before the warm-up decode: read the dense weights in bulk, switch
        off fault read-ahead on the base file's experts (one fault would read megabytes of experts no
        view will ever read) and make the warm-up decode read expert 0 of each layer only, read in
        bulk here. False where the base file's mapping cannot be found (not Linux)."""
        # llama.cpp maps the whole file once and unmaps the header's pages after loading: the mapping
        # that remains starts at a file offset > 0
        maps = {a - off for a, _n, off in vm.file_mappings(str(self.index.base_path))}
        if len(maps) != 1:
            return False
        addr = maps.pop()
        experts = {n: t for n, t in self.index.base_tensors.items() if is_expert_tensor(n)}
        dense = sorted((t.offset, t.nbytes) for n, t in self.index.base_tensors.items() if n not in experts)
        first = [(t.offset, t.nbytes // self.index.n_expert) for t in experts.values()]  # expert 0's slices
        for t in experts.values():
            vm.madvise(addr + t.offset, t.nbytes, vm.MADV_RANDOM)
        vm.read_file_ranges(str(self.index.base_path), dense + first)
        self._warmup_expert = 0
        return True

    def _attach(self, llm: Any, populate_dense: bool = False) -> None:
        """Warm-up decode to discover the weight tensors, then map tiers, bind views, start the pager."""
        bos = llm.token_bos()
        llm.eval([bos if bos >= 0 else 0])
        llm.reset()
        if self.observer.error is not None:
            raise DymoeError(f"eval callback failed: {self.observer.error}")
        if not self.observer.ready:
            raise RuntimeConfigError("Could not find the expert tensors in llama.cpp's graph "
                                     "(is this a dymoe-gguf bundle of a supported architecture?)")
        d = self.observer.discovered
        if self.k <= 0:
            raise RuntimeConfigError("The warm-up decode selected no experts")
        self.importance = decide.ImportanceTracker(len(self.moe_layers), self.index.n_expert, self.k,
                                                   decide.ImportanceConfig(half_life_tokens=self.cfg.half_life))
        self._seed_importance()
        if self.cfg.policy == "observe":
            self._live = True
            self.counter.start()
            return
        if self.cfg.lookahead:
            try:
                self._routers = {layer: weight_matrix(p) for layer, p in d.routers.items()}
                self._norms = {layer: weight_matrix(p) for layer, p in d.ffn_norms.items()}
            except ValueError:
                log.warning("router weights are not F32: look-ahead disabled")
                self._routers = {}
            # [d, E] per layer: router with the FFN norm weight folded in
            self._la = {layer: np.ascontiguousarray((r * self._norms.get(layer, 1.0)).T)
                        for layer, r in self._routers.items()}
        for i, tier in enumerate(self.index.tiers):
            self._mappings[i] = vm.Mapping.open(str(self.index.tier_paths[tier]))
        self.views = Views(self.index, self._mappings, self.patch)
        self.views.bind(d.experts)
        self.pager = Pager(self.index, self._mappings, self.cfg.budget, self.views.base_ranges())
        for addr, n in self.views.base_ranges():
            vm.madvise(addr, n, vm.MADV_RANDOM)
        if populate_dense:  # the non-expert weights are read every token: bring them in now, in bulk
            self._populate_dense()
        self._reallocate()
        self._apply_all()
        self.pager.enforce_now()  # load-time populate may have left everything resident
        self.pager.stats.max_resident = 0
        self.pager.start()
        self.counter.start()
        self._live = True

    def _seed_importance(self) -> None:
        from dymoe_gguf.quality.profile import load_profile

        prof = load_profile(self.index)
        if prof is not None:
            self.importance.seed(decide.ImportanceProfile(prof.freq[list(self.moe_layers)],
                                                          prof.mass[list(self.moe_layers)]))

    # ------------------------------------------------------------------ decide
    def _budget(self) -> int:
        return self.cfg.budget if self.cfg.budget is not None else int(self.sizes[..., -1].sum()) + 1

    def set_tiers(self, tiers: np.ndarray | dict[tuple[int, int], str]) -> None:
        """Policy ``manual``: the tier each (MoE layer, expert) reads, applied now (call between decodes).

        ``tiers`` is an int array ``[n_moe_layers, n_expert]`` of tier indices (``-2`` = the base
        file's own copy) or a dict ``{(layer, expert): "Q2_K" | "base"}`` over the base.
        """
        if self.cfg.policy != "manual":
            raise RuntimeConfigError("set_tiers() needs policy 'manual'")
        if isinstance(tiers, dict):
            arr = np.full(self.sizes.shape[:2], BASE, dtype=np.int16)
            for (layer, e), name in tiers.items():
                arr[self._mi[layer], e] = BASE if name == "base" else self.index.tiers.index(parse_tier(name))
            tiers = arr
        tiers = np.asarray(tiers, dtype=np.int16)
        if tiers.shape != self.sizes.shape[:2] or tiers.min() < BASE or tiers.max() >= self.n_tiers:
            raise RuntimeConfigError(f"Expected tiers of shape {self.sizes.shape[:2]} in [-2, {self.n_tiers - 1}]")
        if self.mode == "per-layer" and any(len(set(row.tolist())) > 1 for row in tiers):
            raise RuntimeConfigError("Per-layer views (stock llama.cpp) need one tier per layer")
        self._manual = tiers
        self._vt = tiers.copy()
        if self.views is not None:
            self._apply_all()

    def _reallocate(self) -> None:
        """Re-plan tiers from current importance (also at attach)."""
        if self.cfg.policy == "manual":
            if self._manual is None:
                self._manual = np.full(self.sizes.shape[:2], BASE, dtype=np.int16)
            new = decide.Assignment.from_tiers(np.maximum(self._manual, -1).astype(np.int64), self.sizes)
        elif self.cfg.uniform_tier is not None:
            t = self.index.tiers.index(parse_tier(self.cfg.uniform_tier))
            tiers = np.full(self.sizes.shape[:2], t, dtype=np.int64)
            new = decide.Assignment.from_tiers(tiers, self.sizes)
        else:
            alloc = decide.allocate if self.mode == "per-expert" else decide.allocate_per_layer
            new = alloc(self.importance.scores, self.sizes, self._budget(), self.schedule,
                        current=self.assignment,
                        cfg=decide.AllocationConfig(promote_margin=self.cfg.promote_margin))
        if self.assignment is not None:
            self.counter.tier_changes += new.n_changes(self.assignment)
        self.assignment = new
        self._vt = np.stack([self._view_tiers(mi) for mi in range(len(self.moe_layers))])
        if self.pager is not None:
            self.pager.set_plan(self._full(new.tiers, -1), self._full(self.importance.scores, 0.0))

    def _full(self, per_moe: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((self.index.n_layer, self.index.n_expert), fill, dtype=per_moe.dtype)
        out[list(self.moe_layers)] = per_moe
        return out

    def _view_tiers(self, mi: int) -> np.ndarray:
        """Tier each expert of MoE layer ``mi`` is read at (-1 -> lowest tier; BASE under manual)."""
        if self._manual is not None:
            return self._manual[mi]
        assert self.assignment is not None
        return np.maximum(self.assignment.tiers[mi], 0)

    def _apply_all(self) -> None:
        assert self.views is not None
        for layer in self.moe_layers:
            self._apply(layer)

    def _apply(self, layer: int, experts: np.ndarray | None = None) -> None:
        """Point ``layer``'s experts (all, or those about to be read) at their planned tiers."""
        assert self.views is not None
        tiers = self._vt[self._mi[layer]]
        if self.views.mode == "per-layer":
            self.views.set_layer(layer, int(tiers.max()) if tiers.min() != BASE else BASE)
        else:
            self.views.set_experts(layer, tiers, only=experts)

    # ------------------------------------------------------------------ observe (callback thread)
    def _on_topk(self, layer: int, ptr: int) -> None:
        """The per-layer safe point. Hot path: only what must happen before this layer's matmuls
        (views, the budget, skip, look-ahead prefetch) runs here; bookkeeping waits for the end of
        the token, when it is done for all layers at once."""
        view = read_topk(ptr)
        ids = view.copy()  # [n_tokens, k]
        if not self._live:  # warm-up decode: discovery only
            self.k = ids.shape[1]
            if self._warmup_expert is not None:  # read only the expert already brought in
                view[:] = self._warmup_expert
            return
        mi = self._mi[layer]
        n = len(ids)
        peeked = self.observer.peeked
        p_ptr = peeked.get(("ffn_moe_probs", layer))
        probs = read_f32(p_ptr) if p_ptr is not None else None  # live view: read now, never kept
        if probs is not None and len(probs) == n:
            w = probs[np.arange(n)[:, None], ids]
            if self._norm_w:
                w /= np.maximum(w.sum(1, keepdims=True), 6.1e-5)
        else:
            w = np.full(ids.shape, 1.0 / ids.shape[1], dtype=np.float32)
        if mi == 0:
            self._step = []
            if self.pager is not None:
                self.pager.new_step()
        self._step.append((mi, ids, w))
        if self.trace is not None:
            h_ptr = peeked.get(("ffn_inp", layer))
            self.trace.append((mi, ids, w, np.array(probs) if probs is not None else np.zeros(0),
                               np.array(read_f32(h_ptr)) if h_ptr is not None else None))
        for hook in self.routing_hooks:
            hook(layer, ids)
        if self.views is not None:
            used = ids
            if self.skip is not None:
                res = decide.skip_slots(ids, w, self.skip)
                if res.n_dropped:
                    view[:] = res.ids
                    used = res.ids
                    self._skip_w[layer] = res.weights
                    self.counter.skipped += res.n_dropped
            experts = np.unique(used)
            tiers = self._vt[mi][experts]
            if self.views.mode == "per-expert":
                self.views.set_experts(layer, self._vt[mi], only=experts)
            if self.pager is not None:
                if self.cfg.measure_hits and self.cfg.budget is not None:
                    self._count_hits(mi, layer, experts, tiers)
                ok = tiers >= 0
                self.pager.use(layer, experts[ok], tiers[ok])
                self._lookahead(layer, mi, n)
        if mi == len(self.moe_layers) - 1:
            self._end_of_step(n)

    def _on_weights(self, layer: int, ptr: int) -> None:
        w = self._skip_w.pop(layer, None)
        if w is not None:
            read_f32(ptr)[:] = w  # [n_tokens, k] view of ffn_moe_weights-N ([1, k, n_tokens])

    def _count_hits(self, mi: int, layer: int, experts: np.ndarray, tiers: np.ndarray) -> None:
        """Of the experts selected now, how many were already resident (mincore) in their tier."""
        assert self.pager is not None
        off, ln = self.pager.off, self.pager.len
        hits = 0
        for e, t in zip(experts.tolist(), tiers.tolist()):
            if t < 0:  # the base file's copy (manual policy): not paged by us
                continue
            addr = self._mappings[t].addr
            hits += all(vm.mincore(addr + int(off[layer, e, t, i]), int(ln[layer, e, t, i])).all() for i in range(3))
        self.counter.hits[mi] += hits
        self.counter.uses[mi] += len(experts)

    def _predict(self, hidden: np.ndarray, target_mi: int) -> np.ndarray:
        """Top-k of MoE layer ``target_mi``'s router on ``hidden`` [n, d] (the norm weight is folded
        into ``_la``; the per-token RMS scale cannot change a row's ranking)."""
        logits = hidden @ self._la[self.moe_layers[target_mi]]  # [n, E]
        return np.argpartition(logits, -self.k, axis=1)[:, -self.k:]

    def _prefetch(self, target_mi: int, pred: np.ndarray) -> None:
        assert self.pager is not None
        if not self.counter.prefetching[target_mi]:  # predictions too poor to pay for their reads
            return
        experts = np.unique(pred)
        tiers = self._vt[target_mi][experts]
        ok = tiers >= 0
        self.pager.request(self.moe_layers[target_mi], experts[ok], tiers[ok])

    def _lookahead(self, layer: int, mi: int, n: int) -> None:
        """Early prediction (at layer ``mi``'s top-k) of the next layers, from the residual stream
        entering this layer's FFN: prefetch only; distances >= 2 are also scored."""
        h_ptr = self.observer.peeked.get(("ffn_inp", layer))
        if h_ptr is None or not self._la or self.pager is None or mi + 1 >= len(self.moe_layers):
            return
        hidden = read_f32(h_ptr)
        if len(hidden) != n:
            return
        for dist in range(1, self.cfg.lookahead + 1):
            if mi + dist >= len(self.moe_layers):
                break
            pred = self._predict(hidden, mi + dist)
            if dist > 1:
                self._pred.setdefault(mi + dist, []).append((dist, pred))
            self._prefetch(mi + dist, pred)

    def _on_layer_out(self, layer: int, ptr: int) -> None:
        """Refined prediction of the next layer from this layer's output (its input): scored as
        the distance-1 look-ahead, and any expert the early prediction missed is prefetched."""
        mi = self._mi[layer]
        if not self._live or not self._la or self.pager is None or mi + 1 >= len(self.moe_layers):
            return
        pred = self._predict(read_f32(ptr), mi + 1)
        self._pred.setdefault(mi + 1, []).append((1, pred))
        self._prefetch(mi + 1, pred)

    RECALL_ALPHA = 0.1  # weight of the latest token in the moving average of look-ahead recall

    def _update_recall(self, mi: int, recall: float) -> None:
        """Prefetch for layer ``mi`` only while its recent recall is at least ``lookahead_min_recall``
        (with a small hysteresis band, so the decision does not flap); predictions go on either way,
        so prefetch comes back when routing becomes predictable."""
        c = self.counter
        c.recall_recent[mi] += self.RECALL_ALPHA * (recall - c.recall_recent[mi])
        floor = self.cfg.lookahead_min_recall
        if c.prefetching[mi] and c.recall_recent[mi] < floor:
            c.prefetching[mi] = False
        elif not c.prefetching[mi] and c.recall_recent[mi] >= min(1.0, floor + 0.05):
            c.prefetching[mi] = True

    def _end_of_step(self, n_tokens: int) -> None:
        """After the last layer's routing: importance, look-ahead recall, re-planning — all layers at once."""
        step, self._step = self._step, []
        n_tokens = len(step[0][1]) if step else n_tokens  # the last layer keeps output rows only
        if self.cfg.policy != "static":
            if len(step) == len(self.moe_layers) and all(len(s[1]) == 1 for s in step):  # decode: vectorised
                self.importance.update_token(np.concatenate([s[1] for s in step]),
                                             np.concatenate([s[2] for s in step]))
            else:
                for mi, ids, w in step:
                    self.importance.update(mi, ids, w)
        for mi, ids, _w in step:
            for dist, pred in self._pred.pop(mi, ()):
                pred = pred[len(pred) - len(ids):]  # the last layer keeps output rows only
                hits = sum(len(set(a) & set(p)) for a, p in zip(ids.tolist(), pred.tolist()))
                self.counter.lookahead.record(mi, dist, hits, ids.size, pred.size)
                if dist == 1 and ids.size:
                    self._update_recall(mi, hits / ids.size)
        self._pred.clear()
        self.counter.tokens += n_tokens
        self.counter.steps += 1
        self._tokens_since_alloc += n_tokens
        if self.cfg.policy == "dymoe" and self._tokens_since_alloc >= self.cfg.reallocate_every:
            self._tokens_since_alloc = 0
            self._reallocate()
            if self.views is not None and self.views.mode == "per-layer":
                self._apply_all()  # safe: the other layers' experts are computed for this token

    # ------------------------------------------------------------------ results and teardown
    def stats(self) -> ControllerStats:
        """A snapshot of what the controller measured."""
        resident = self.pager.resident_bytes() if self.pager is not None else 0
        return self.counter.snapshot(
            mode=self.mode if self.cfg.policy != "off" else "off", policy=self.cfg.policy,
            budget=self.cfg.budget, resident=resident, views=self.views, pager=self.pager,
            observer=getattr(self, "observer", None), index=self.index)

    def close(self) -> None:
        """Restore every tensor, stop the pager, free the Llama and the mappings. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.views is not None and self.views.bound:
                self.views.restore()
        finally:
            if self.pager is not None:
                self.pager.stop()
            if self._llm is not None:
                self._llm.close()
                self._llm = None
            for m in self._mappings.values():
                m.close()
            self._mappings.clear()
            self._cb = None

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter teardown
        try:
            self.close()
        except Exception:
            pass
