"""The controller: attaches to a ``llama_cpp.Llama`` and wires observe -> decide -> apply.

    with Controller.open("model.dymoe", memory_budget="2GiB", policy="dymoe") as ctl:
        llm = ctl.llama(n_ctx=2048, n_threads=4)   # a normal llama_cpp.Llama
        print(llm.create_completion("The history of", max_tokens=64)["choices"][0]["text"])
        print(ctl.stats().to_dict())

:mod:`.loader` builds the model (cold start, tensor discovery); :mod:`.observe` is the eval
callback; :mod:`.step` is what runs in it per layer and per token; :mod:`.decide` plans tiers
(pure numpy); :mod:`.views` and :mod:`.pager` apply the plan. This module only connects them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dymoe_gguf._native import vm
from dymoe_gguf._native.llama import open_llama
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import parse_tier
from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime import decide, loader
from dymoe_gguf.runtime.config import Mode, Policy, RuntimeConfig, make_config, resolve_pins
from dymoe_gguf.runtime.observe import Observer
from dymoe_gguf.runtime.pager import Pager
from dymoe_gguf.runtime.stats import ControllerStats, StatsCounter
from dymoe_gguf.runtime.step import Step
from dymoe_gguf.runtime.views import Views

_RENORMALISED = {"llama", "qwen3moe"}  # archs whose top-k weights llama.cpp renormalises (norm_w)


class Controller:
    """Decides and applies expert tiers for one bundle and the one ``Llama`` made from it."""

    def __init__(self, index: BundleIndex, cfg: RuntimeConfig) -> None:
        self.index = index
        self.cfg = cfg
        self.moe_layers = index.moe_layers
        self.sizes = index.expert_bytes()[list(self.moe_layers)]  # [Lm, E, T]
        self.pins = resolve_pins(cfg, index)
        self.patch = loader.load_patch(cfg.mode) if cfg.policy is not Policy.OFF else None
        self.views: Views | None = None
        self.pager: Pager | None = None
        self.observer: Observer | None = None
        self.step: Step | None = None
        self.counter = StatsCounter(len(self.moe_layers), cfg.lookahead)
        self._mappings: dict[int, vm.Mapping] = {}
        self._loaded: loader.Loaded | None = None  # holds the callback object llama.cpp calls
        self._llm: Any = None
        self._closed = False
        # set before llama(): extra eval-callback handlers by node kind (e.g. "ffn_norm": fn(layer, ptr)),
        # and functions fn(layer, ids [n_tokens, k]) called with each layer's routing
        self.extra_handlers: dict = {}
        self.routing_hooks: list = []

    @classmethod
    def open(cls, bundle: str | Path, memory_budget: str | int | None = None, policy: str = "dymoe",
             **options: Any) -> Controller:
        """Open a bundle; ``options`` are :class:`RuntimeConfig` fields (lookahead, skip_threshold, …)."""
        cfg = make_config(policy, memory_budget, **options)
        index = BundleIndex(Path(bundle))
        if cfg.uniform_tier is not None and parse_tier(cfg.uniform_tier) not in index.tiers:
            raise RuntimeConfigError(f"Tier {cfg.uniform_tier} is not in this bundle (tiers: "
                                     f"{', '.join(t.name for t in index.tiers)})")
        return cls(index, cfg)

    @property
    def mode(self) -> str:
        return Mode.PER_EXPERT.value if self.patch is not None else Mode.PER_LAYER.value

    @property
    def trace(self) -> list | None:
        """Set to a list (after llama()) to record every layer's routing (:class:`.observe.LayerRouting`)."""
        return self.step.trace if self.step is not None else None

    @trace.setter
    def trace(self, value: list | None) -> None:
        self.step.trace = value

    # ------------------------------------------------------------------ building
    def llama(self, **kwargs: Any) -> Any:
        """The ``llama_cpp.Llama`` for this bundle (mmap on, repack off, eval callback set)."""
        if self._closed:
            raise RuntimeConfigError("This controller is closed")
        if self._llm is not None:
            raise RuntimeConfigError("Controller.llama() was already called: one Llama per controller")
        repack = kwargs.pop("repack", self.cfg.policy is Policy.OFF)  # off: llama.cpp's own default (repack on)
        if self.cfg.policy is Policy.OFF:
            self._llm = open_llama(self.index.base_path, repack=repack, **kwargs)
            return self._llm
        if repack:
            raise RuntimeConfigError("Repack copies experts into anonymous memory: only policy 'off' can use it")
        step = self.step = Step(self.moe_layers, self.cfg, self.counter, renormalised=self.index.arch in _RENORMALISED)
        step.routing_hooks = self.routing_hooks
        handlers = {"ffn_moe_topk": step.on_topk, **self.extra_handlers}
        if self.cfg.skip_threshold > 0:
            handlers["ffn_moe_weights"] = step.on_weights
        if self.cfg.lookahead > 0 and self.cfg.policy is not Policy.OBSERVE:
            handlers.setdefault("l_out", step.on_layer_out)
        peek = ("ffn_moe_probs", "ffn_inp") if self.cfg.lookahead > 0 else ("ffn_moe_probs",)
        self.observer = step.observer = Observer(self.moe_layers, handlers, peek)
        no_populate = self.patch is not None and self.cfg.budget is not None  # cold start
        self._loaded = loader.load(self.index, self.observer, no_populate=no_populate, llama_kwargs=kwargs)
        self._llm = self._loaded.llm
        try:
            self._attach(self._loaded)
        except BaseException:
            self.close()
            raise
        return self._llm

    def _attach(self, loaded: loader.Loaded) -> None:
        """After the warm-up decode: plan, bind views, start the pager, go live."""
        cfg, step, d = self.cfg, self.step, loaded.discovered
        step.importance = loader.initial_importance(self.index, loaded.k, cfg.half_life)
        uniform = self.index.tiers.index(parse_tier(cfg.uniform_tier)) if cfg.uniform_tier else None
        step.planner = decide.Planner(self.sizes, step.importance, decide.DepthSchedule(
            cfg.depth, r_max=cfg.r_max, r_min=cfg.r_min, pins=self.pins), budget=cfg.budget,
            per_layer=self.patch is None, uniform_tier=uniform, manual=cfg.policy is Policy.MANUAL,
            alloc=decide.AllocationConfig(promote_margin=cfg.promote_margin))
        if cfg.policy is not Policy.OBSERVE:
            if cfg.lookahead:
                step.predictor = loader.predictor(self.index, d, loaded.k)
            for i, tier in enumerate(self.index.tiers):
                self._mappings[i] = vm.Mapping.open(str(self.index.tier_paths[tier]))
            self.views = step.views = Views(self.index, self._mappings, self.patch)
            self.views.bind(d.experts)
            self.pager = step.pager = Pager(self.index, self._mappings, cfg.budget, self.views.base_ranges())
            for addr, n in self.views.base_ranges():
                vm.madvise(addr, n, vm.MADV_RANDOM)
            if self.patch is not None and cfg.budget is not None and not loaded.cold_start:
                loader.populate_dense(self.index, self.views.mapped_base())  # read every token: in bulk now
            step.replan(apply_all=True)
            self.pager.enforce_now()  # load-time populate may have left everything resident
            self.pager.stats.max_resident = 0
            self.pager.start()
        self.counter.start()
        self.observer.go_live()

    # ------------------------------------------------------------------ manual tiers
    def set_tiers(self, tiers: np.ndarray | dict[tuple[int, int], str]) -> None:
        """Policy ``manual``: the tier each (MoE layer, expert) reads, applied now (call between decodes).

        ``tiers`` is an int array ``[n_moe_layers, n_expert]`` of tier indices (``-2`` = the base
        file's own copy) or a dict ``{(layer, expert): "Q2_K" | "base"}`` over the base.
        """
        if self.step is None or self.step.planner is None:
            raise RuntimeConfigError("Call llama() before set_tiers()")
        if isinstance(tiers, dict):
            arr = np.full(self.sizes.shape[:2], decide.BASE, dtype=np.int16)
            mi = {layer: i for i, layer in enumerate(self.moe_layers)}
            for (layer, e), name in tiers.items():
                arr[mi[layer], e] = decide.BASE if name == "base" else self.index.tiers.index(parse_tier(name))
            tiers = arr
        self.step.planner.set_manual(tiers)
        self.step.replan(apply_all=True)

    # ------------------------------------------------------------------ results and teardown
    def stats(self) -> ControllerStats:
        """A snapshot of what the controller measured."""
        return self.counter.snapshot(
            mode=self.mode if self.cfg.policy is not Policy.OFF else "off", policy=self.cfg.policy_name,
            budget=self.cfg.budget, views=self.views, pager=self.pager, observer=self.observer, index=self.index,
            step=self.step)

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
            self._loaded = None

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter teardown
        try:
            self.close()
        except Exception:
            pass
