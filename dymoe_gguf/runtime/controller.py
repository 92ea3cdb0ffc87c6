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

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dymoe_gguf._native import vm
from dymoe_gguf._native.llama import open_llama, retire
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime import loader
from dymoe_gguf.runtime.config import (
    Mode,
    Policy,
    RuntimeConfig,
    check_against,
    check_budget_floor,
    make_config,
    manual_tiers,
    parse_budget,
    resolve_auto_budget,
)
from dymoe_gguf.runtime.guard import CLOSED, ClosedError, Guard
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
        self.patch = loader.load_patch(cfg.mode) if cfg.policy is not Policy.OFF else None
        self.views: Views | None = None
        self.pager: Pager | None = None
        self.observer: Observer | None = None
        self.counter = StatsCounter(len(self.moe_layers), cfg.lookahead)
        self.step = Step(self.moe_layers, cfg, self.counter, renormalised=index.arch in _RENORMALISED)
        self._mappings: dict[int, vm.Mapping] = {}
        self._loaded: loader.Loaded | None = None  # holds the callback object llama.cpp calls
        self._llm: Any = None
        self._closed = False
        self.guard = Guard()
        self._final: ControllerStats | None = None  # the stats at close, returned by stats() afterwards
        # set before llama(): extra eval-callback handlers by node kind (e.g. "ffn_norm": fn(layer, ptr)),
        # and functions fn(layer, ids [n_tokens, k]) called with each layer's routing
        self.extra_handlers: dict = {}
        self.routing_hooks: list = self.step.routing_hooks

    @classmethod
    def open(cls, bundle: str | Path, memory_budget: str | int | None = None, policy: str = "dymoe",
             **options: Any) -> Controller:
        """Open a bundle; ``options`` are :class:`RuntimeConfig` fields (lookahead, skip_threshold, …)."""
        cfg = make_config(policy, memory_budget, **options)
        index = BundleIndex(Path(bundle))
        check_against(cfg, index)
        return cls(index, cfg)

    @property
    def mode(self) -> str:
        return Mode.PER_EXPERT.value if self.patch is not None else Mode.PER_LAYER.value

    @property
    def trace(self) -> list | None:
        """Set to a list to record every layer's routing (:class:`.observe.LayerRouting`)."""
        return self.step.trace

    @trace.setter
    def trace(self, value: list | None) -> None:
        self.step.trace = value

    # ------------------------------------------------------------------ building
    def llama(self, **kwargs: Any) -> Any:
        """The ``llama_cpp.Llama`` for this bundle (mmap on, repack off, eval callback set)."""
        if self._closed or self._llm is not None:
            raise RuntimeConfigError("This controller is closed" if self._closed else
                                     "Controller.llama() was already called: one Llama per controller")
        # llama.cpp's extra buffer types (CPU_REPACK, AMX) only when asked for: they copy experts out of the
        repack = kwargs.pop("repack", False)  # mapping; AMX's crashes on some Intel CPUs (llama.cpp #20824)
        if self.cfg.policy is Policy.OFF:
            self._llm = open_llama(self.index.base_path, repack=repack, guard=self.guard, **kwargs)
            return self._llm
        if repack:
            raise RuntimeConfigError("Repack copies experts into anonymous memory: only policy 'off' can use it")
        self.cfg = resolve_auto_budget(self.cfg, self.index, kwargs)
        self.observer = self.step.make_observer(self.extra_handlers, self.guard)
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
        cfg, step = self.cfg, self.step
        step.importance = loader.initial_importance(self.index, loaded.k, cfg.half_life)
        step.planner = loader.planner(self.index, cfg, step.importance, per_layer=self.patch is None)
        if cfg.policy is not Policy.OBSERVE:
            if cfg.lookahead:
                step.predictor = loader.predictor(self.index, loaded.discovered, loaded.k)
            self._mappings, self.views, self.pager = loader.apply_side(self.index, cfg, loaded, self.patch)
            step.views, step.pager = self.views, self.pager
            step.replan(apply_all=True)
            check_budget_floor(cfg.budget, self.index, self._llm.context_params.n_ubatch)
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
        if self.step.planner is None:
            raise RuntimeConfigError("Call llama() before set_tiers()")
        self.step.planner.set_manual(manual_tiers(self.index, tiers) if isinstance(tiers, dict) else tiers)
        self.step.replan(apply_all=True)

    def set_budget(self, memory_budget: str | int) -> None:
        """Change the budget (between decodes): re-plan for it and evict down to it now."""
        budget = parse_budget(memory_budget)
        if self.pager is None or budget is None:
            raise RuntimeConfigError("set_budget() needs a controller opened with a budget, after llama()")
        check_budget_floor(budget, self.index, self._llm.context_params.n_ubatch)
        self.step.set_budget(budget)
        self.cfg = replace(self.cfg, budget=budget)

    # ------------------------------------------------------------------ results and teardown
    def stats(self) -> ControllerStats:
        """A snapshot of what the controller measured (after close: the last one, taken at close)."""
        if self._closed:
            if self._final is None:
                raise ClosedError("This controller was closed before it loaded a model: it has no stats")
            return self._final
        return self.counter.snapshot(self)

    def close(self) -> None:
        """Wait for a running decode, restore every tensor, stop the pager, free the Llama and the
        mappings; the Llama raises :class:`ClosedError` if used afterwards. Safe to repeat."""
        if self._closed:
            return
        self.guard.close()
        if self._llm is not None:
            self._final = self.stats()
        self._closed = True
        try:
            if self.views is not None and self.views.bound:
                self.views.restore()
        finally:
            if self.pager is not None:
                self.pager.stop()
            if self._llm is not None:
                self._llm.close()
                retire(self._llm, ClosedError(CLOSED))
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
