"""Apply (2/3): the pager — the only code that makes OS paging calls on expert bytes.

It keeps a *model* of which expert ranges are resident (bytes per (layer, expert, tier)), updated
when an expert is used or prefetched and when a range is evicted, and corrected from ``mincore``
by its background thread. With it:

* ``use()`` — called at a layer's safe point, *before* its experts are read — counts the bytes the
  layer is about to fault in and, if that would break the budget, evicts first (synchronously), so
  resident expert bytes stay under the budget throughout a step, not only between steps;
* ``request()`` queues look-ahead prefetches for the thread, which reads them with large ``pread``
  calls on descriptors opened ``POSIX_FADV_RANDOM`` (no read-ahead into neighbouring experts), and
  warms the planned resident set when idle;
* eviction order: copies the plan does not keep (least recently used first), then kept experts of
  lowest importance; ranges in use this step are never evicted. ``MADV_PAGEOUT``/``MADV_DONTNEED``
  + ``FADV_DONTNEED`` drop them;
* ``ready`` flags, per (layer, expert), say whether the copy its view reads is resident: the C hot
  path reads them to know which selected experts need ``use()`` (the miss path).

The thread (prefetch, warm, ``mincore`` corrections) is :mod:`.prefetch`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from dymoe_gguf._native import vm
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import MATRICES, is_expert_tensor
from dymoe_gguf.runtime.prefetch import PagerThread

log = logging.getLogger(__name__)


@dataclass
class PagerStats:
    """Counters kept by the pager."""

    prefetch_requests: int = 0
    prefetched_ranges: int = 0
    demand_reads: int = 0  # experts read in bulk at the safe point because no prefetch had brought them
    demand_seconds: float = 0.0  # time those reads took
    demand_bytes: int = 0  # and the bytes they read
    evictions: int = 0
    evicted_bytes: int = 0
    syncs: int = 0
    base_dropped_bytes: int = 0  # base-file expert bytes found resident and dropped (read-around)
    max_resident: int = 0  # highest resident expert bytes measured by mincore
    last_resident: int = 0
    seconds: float = 0.0  # time spent in the pager thread


class Pager(PagerThread):
    """Residency model, prefetch, warm and evict for the sidecar mappings under a byte budget."""

    TARGET = 0.88  # evict down to this share of the budget when it would be exceeded (room for reads in flight)
    SYNC_EVERY = 0.25  # seconds between mincore corrections of the model (1 s without a budget)

    def __init__(self, index: BundleIndex, mappings: dict[int, vm.Mapping], budget: int | None,
                 mapped_base: int | None = None, *, drop_base: bool = True) -> None:
        self.index = index
        self.mappings = mappings
        self.budget = budget
        # the base file's expert tensors: (file offset, length) in llama.cpp's mapping of it
        self.base_ranges = [] if mapped_base is None else [
            (t.offset, t.nbytes) for n, t in index.base_tensors.items() if is_expert_tensor(n)]
        # no view reads the base file's experts (every policy but manual): whatever of them is
        # found resident was brought in behind our back (read-around) and is dropped at each sync
        self.drop_base = drop_base
        self.base_fd = os.open(index.base_path, os.O_RDONLY)
        self.base = None if mapped_base is None else vm.Mapping.borrow(index.base_path, mapped_base, fd=self.base_fd)
        L, E, T = index.n_layer, index.n_expert, len(index.tiers)
        self.off = np.zeros((L, E, T, 3), dtype=np.int64)  # (layer, expert, tier, matrix) -> file offset
        self.len = np.zeros((L, E, T, 3), dtype=np.int64)
        for layer in index.moe_layers:
            for t, tier in enumerate(index.tiers):
                for i, m in enumerate(MATRICES):
                    for e in range(E):
                        s = index.slice(layer, m, e, tier)
                        self.off[layer, e, t, i] = s.offset
                        self.len[layer, e, t, i] = s.nbytes
        self.full = vm.span(self.off, self.len).sum(-1)  # [L, E, T] memory of one expert copy: its whole pages
        self._p0 = self.off // vm.PAGE
        self._p1 = (self.off + self.len + vm.PAGE - 1) // vm.PAGE
        self.model = np.zeros((L, E, T), dtype=np.int64)  # modelled resident bytes
        self.total = 0  # == self.model.sum(), kept up to date
        self.last = np.zeros((L, E, T), dtype=np.int64)  # step of last use
        # ranges being read right now (outside the lock): never evicted, or the read would bring
        # back pages the model has already written off
        self.inflight = np.zeros((L, E, T), dtype=bool)
        # when each entry of the model was last changed (a counter, not a clock): sync() keeps the
        # model's value for entries changed while it measured instead of a stale mincore reading
        self.changed = np.zeros((L, E, T), dtype=np.int64)
        self._epoch = 0
        self.step = 1  # a counter of safe points, for least-recently-used order
        # the experts the layer being computed reads (the last use()): never evicted
        self._current: tuple[int, np.ndarray, np.ndarray] | None = None
        self.keep = np.full((L, E), -1, dtype=np.int16)  # planned tier per expert (-1: not kept)
        self.scores = np.zeros((L, E), dtype=np.float64)
        self._queue: deque[tuple[int, int, int]] = deque()
        # 1 where the copy an expert's view reads is resident and not being read (the C hot path's flags)
        self.view_tier = np.zeros((L, E), dtype=np.int64)
        self.ready = np.zeros((L, E), dtype=np.uint8)
        # the thread sleeps on an Event, or with the C hot path on a pipe C can write to
        self._wake = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.external: Any = None  # () -> [(layer, expert, tier)]: prefetch requests queued elsewhere
        self.reading: Any = None  # () -> (layer, experts) the layer being computed reads, or None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._dirty = True  # plan changed: warm again
        self.stats = PagerStats()
        self._thread = threading.Thread(target=self._run, name="dymoe-pager", daemon=True)

    # ------------------------------------------------------------------ control
    def set_views(self, moe_layers: tuple[int, ...], view_tiers: np.ndarray) -> None:
        """The tier each expert's view reads, ``[n_moe_layers, n_expert]`` (ready flags follow it)."""
        with self._lock:
            self.view_tier[list(moe_layers)] = np.maximum(view_tiers, 0)
            self._ready_all()

    def _ready_all(self) -> None:
        L, E = self.ready.shape
        li, ei = np.arange(L)[:, None], np.arange(E)[None, :]
        self._ready(li, ei)

    def _ready(self, layer: Any, experts: Any) -> None:
        """Recompute the ready flags of ``(layer, experts)`` from the model (caller holds the lock)."""
        vt = self.view_tier[layer, experts]
        ok = (self.model[layer, experts, vt] >= self.full[layer, experts, vt]) & ~self.inflight[layer, experts, vt]
        self.ready[layer, experts] = ok

    def set_plan(self, moe_layers: tuple[int, ...], kept: np.ndarray, scores: np.ndarray) -> None:
        """The planned tier per expert of each MoE layer (-1 = not resident), ``kept`` [n_moe_layers,
        n_expert], and the importance ordering evictions, ``scores`` of the same shape."""
        keep = np.full(self.keep.shape, -1, dtype=np.int16)
        keep[list(moe_layers)] = kept
        full_scores = np.zeros(self.scores.shape)
        full_scores[list(moe_layers)] = scores
        scores = full_scores
        with self._lock:
            changed = not np.array_equal(keep, self.keep)
            self.keep = keep
            self.scores = scores.astype(np.float64, copy=True)
            self._dirty |= changed
        if changed:
            self.wake()

    def new_step(self) -> None:
        """A token (or batch) begins: later uses count as more recent."""
        self.step += 1

    def use(self, layer: int, experts: np.ndarray, tiers: np.ndarray) -> None:
        """Experts about to be read at ``tiers`` (callback thread, before the layer's matmuls).

        They are protected from eviction until the next call (the next layer); if reading them
        would break the budget, other ranges are evicted first. Whatever of them is not resident
        is read now, in bulk, instead of being faulted in page by page by the matmul.
        """
        with self._lock:
            self._current = (layer, experts, tiers)
            full = self.full[layer, experts, tiers]
            missing = self.model[layer, experts, tiers] < full
            self.total += int((full - self.model[layer, experts, tiers]).sum())
            self.model[layer, experts, tiers] = full
            self.last[layer, experts, tiers] = self.step
            self._epoch += 1
            self.changed[layer, experts, tiers] = self._epoch
            self.inflight[layer, experts[missing], tiers[missing]] = True
            if self.budget is not None and self.total > self.budget:
                self._evict_to(int(self.budget * self.TARGET))
        t0 = time.perf_counter()
        try:
            for e, t in zip(experts[missing].tolist(), tiers[missing].tolist()):
                m = self.mappings[t]
                for i in range(3):
                    m.prefetch(int(self.off[layer, e, t, i]), int(self.len[layer, e, t, i]))
                self.stats.demand_reads += 1
                self.stats.demand_bytes += int(self.full[layer, e, t])
            self.stats.demand_seconds += time.perf_counter() - t0
        finally:
            with self._lock:
                self.inflight[layer, experts[missing], tiers[missing]] = False
                self._epoch += 1  # a sync that measured during the read must not keep its reading
                self.changed[layer, experts[missing], tiers[missing]] = self._epoch
                self._ready(layer, experts)

    def bandwidth(self, default: float) -> float:
        """Bytes per second the safe point's reads achieved (``default`` until 4 MiB were read)."""
        s = self.stats
        return s.demand_bytes / s.demand_seconds if s.demand_bytes >= 4 << 20 and s.demand_seconds > 0 else default

    def touch(self, layers: np.ndarray, experts: np.ndarray, tiers: np.ndarray) -> None:
        """Copies read this step (the C hot path's log; ``experts < 0`` ignored): the most recently used."""
        ok = experts >= 0
        self.last[layers[ok], experts[ok], tiers[ok]] = self.step

    def request(self, layer: int, experts: np.ndarray, tiers: np.ndarray) -> None:
        """Queue experts of a coming layer for prefetch at ``tiers`` (cheap; callback thread).

        Experts the model already holds resident are not queued, and the thread is woken only
        when something was: an idle pager takes no time (and no GIL) from decoding.
        """
        missing = self.model[layer, experts, tiers] < self.full[layer, experts, tiers]
        if not missing.any():
            return
        for e, t in zip(experts[missing].tolist(), tiers[missing].tolist()):
            self._queue.append((layer, e, t))
        self.stats.prefetch_requests += int(missing.sum())
        self.wake()

    # ------------------------------------------------------------------ measurement
    def count_resident(self, layer: int, experts: np.ndarray, tiers: np.ndarray) -> int:
        """How many of ``experts`` (at ``tiers``; BASE copies are not counted) are resident now (mincore)."""
        hits = 0
        for e, t in zip(experts.tolist(), tiers.tolist()):
            if t < 0:  # the base file's copy (manual policy): not paged by us
                continue
            m = self.mappings[t]
            hits += all(m.pages(int(self.off[layer, e, t, i]), int(self.len[layer, e, t, i])).all() for i in range(3))
        return hits

    def residency(self) -> tuple[np.ndarray, int]:
        """Measured resident bytes per (layer, expert, tier) ``[L, E, T]`` and of the base experts."""
        out = np.zeros(self.model.shape, dtype=np.int64)
        for t, m in self.mappings.items():
            pages = m.residency().astype(np.int64)
            cs = np.concatenate([[0], np.cumsum(pages)])
            p0 = np.minimum(self._p0[:, :, t, :], len(pages))
            p1 = np.minimum(self._p1[:, :, t, :], len(pages))
            out[:, :, t] = ((cs[p1] - cs[p0]) * vm.PAGE).sum(-1)
        base = sum(int(self.base.pages(off, n).sum()) * vm.PAGE for off, n in self.base_ranges)
        return out, base

    def resident_bytes(self) -> int:
        """Measured resident expert bytes (sidecars + base experts)."""
        per, base = self.residency()
        total = int(per.sum()) + base
        self.stats.max_resident = max(self.stats.max_resident, total)
        return total

    def sync(self) -> int:
        """Correct the model from mincore; returns measured resident bytes."""
        with self._lock:
            epoch0 = self._epoch
        per, base = self.residency()
        if base and self.drop_base and self.budget is not None:
            self.drop_base_experts()
        with self._lock:
            touched = (self.changed > epoch0) | self.inflight  # changed while measuring: keep the model's value
            self.model = np.where(touched, np.maximum(self.model, per), per)
            self.total = int(self.model.sum())
            self._ready_all()
        total = int(per.sum()) + base
        self.stats.syncs += 1
        self.stats.last_resident = total
        self.stats.max_resident = max(self.stats.max_resident, total)
        return total

    def drop_base_experts(self, unexpected: bool = True) -> int:
        """Drop the base file's expert pages from this process and the page cache; returns the bytes
        that were resident, counted in ``stats.base_dropped_bytes`` when ``unexpected`` (not the
        load's or the warm-up's). Dense weights, between them, stay (tensors are page-aligned)."""
        resident = 0
        for off, n in self.base_ranges:
            pages = int(self.base.pages(off, n).sum())
            if pages:
                resident += pages * vm.PAGE
                self.base.evict(off, n)
        if unexpected:
            self.stats.base_dropped_bytes += resident
        return resident

    def enforce_now(self) -> int:
        """Drop the base experts (no view reads them) and hold the budget now; returns measured bytes."""
        if self.budget is None:
            return self.resident_bytes()
        if self.drop_base:
            self.drop_base_experts(unexpected=False)
        self.sync()
        with self._lock:
            if self.total > self.budget * self.TARGET:
                self._evict_to(int(self.budget * self.TARGET), protect=False)
        return self.resident_bytes()

    # ------------------------------------------------------------------ eviction (caller holds the lock)
    def _evict_to(self, target: int, protect: bool = True) -> None:
        total = self.total
        L, E, T = self.model.shape
        resident = (self.model > 0) & ~self.inflight
        if protect and self._current is not None:
            layer, experts, tiers = self._current
            resident[layer, experts, tiers] = False
        reading = self.reading() if protect and self.reading is not None else None
        if reading is not None:  # what the layer computing now reads (the C hot path publishes it)
            resident[reading[0], reading[1], :] = False
        kept = np.zeros_like(resident)
        li, ei = np.nonzero(self.keep >= 0)
        kept[li, ei, self.keep[li, ei]] = True
        spare = np.flatnonzero(resident & ~kept)
        spare = spare[np.argsort(self.last.reshape(-1)[spare], kind="stable")]
        held = np.flatnonzero(resident & kept)
        held = held[np.argsort(np.repeat(self.scores.reshape(-1), T)[held], kind="stable")]
        for flat in np.concatenate([spare, held]):
            if total <= target:
                break
            layer, rest = divmod(int(flat), E * T)
            e, t = divmod(rest, T)
            m = self.mappings[t]
            for i in range(3):
                m.evict(int(self.off[layer, e, t, i]), int(self.len[layer, e, t, i]))
            total -= int(self.model[layer, e, t])
            self.stats.evicted_bytes += int(self.model[layer, e, t])
            self.model[layer, e, t] = 0
            self._epoch += 1
            self.changed[layer, e, t] = self._epoch
            self.stats.evictions += 1
            if self.view_tier[layer, e] == t:
                self.ready[layer, e] = 0
        self.total = total
