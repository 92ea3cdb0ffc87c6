"""Apply (1/2): which quant copy each expert tensor reads — the only code that mutates ggml tensors.

Per-layer views work on stock llama.cpp: a layer's 3-D expert tensor (``blk.N.ffn_*_exps.weight``)
gets the type, strides and data pointer of one tier's strided region in a sidecar mapping. The
original ``{type, nb, data}`` is saved at bind time and written back on restore, so restoring is
bit-exact. Changes are made only at safe points: between decodes or inside the eval callback for
``ffn_moe_topk-N`` (before layer N's expert matmuls are planned and run).

Per-expert views (patched llama.cpp, :mod:`dymoe_gguf._native.patch`) give each expert of a layer
its own ``{type, data}``; the same class drives them when the patch is present.
"""

from __future__ import annotations

import logging

import numpy as np
from gguf import GGML_QUANT_SIZES

from dymoe_gguf._native.tensor import TensorState, tensor_at
from dymoe_gguf._native.vm import Mapping
from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import MATRICES, base_expert_name, row_bytes
from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime.decide.planner import BASE

log = logging.getLogger(__name__)


class Views:
    """Owns every view change; ``mode`` is "per-layer" (stock) or "per-expert" (patched)."""

    def __init__(self, index: BundleIndex, mappings: dict[int, Mapping], patch=None) -> None:
        self.index = index
        self.mappings = mappings  # tier index -> sidecar mapping
        self.patch = patch  # dymoe_gguf._native.patch.ExpertViews or None
        self.mode = "per-expert" if patch is not None else "per-layer"
        self._ptr: dict[tuple[int, str], int] = {}
        self._orig: dict[tuple[int, str], TensorState] = {}
        self.layer_tier: dict[int, int] = {}  # per-layer mode: current tier index (BASE = original)
        self.expert_tier: np.ndarray | None = None  # per-expert mode: [n_layer, n_expert]
        self.changes = 0

    @property
    def bound(self) -> bool:
        return bool(self._ptr)

    def bind(self, experts: dict[tuple[int, str], int]) -> None:
        """Remember the expert weight tensors and their original state."""
        for key, ptr in experts.items():
            t = tensor_at(ptr)
            if t.extra:
                raise RuntimeConfigError("Expert tensors are repacked (CPU_REPACK): views need repack off")
            base = self.index.base_tensors[base_expert_name(*key)]
            if (int(t.ne[0]), int(t.ne[1]), int(t.ne[2])) != tuple(reversed(base.shape)):
                raise RuntimeConfigError(f"Loaded tensor for layer {key[0]} {key[1]} does not match the bundle")
            self._ptr[key] = ptr
            self._orig[key] = TensorState.read(t)
        self.layer_tier = {layer: BASE for layer in self.index.moe_layers}
        self.expert_tier = np.full((self.index.n_layer, self.index.n_expert), BASE, dtype=np.int16)

    def originals(self) -> dict[tuple[int, str], tuple[int, TensorState]]:
        """(layer, matrix) -> (tensor address, its state before any view): what restore writes back."""
        return {key: (ptr, self._orig[key]) for key, ptr in self._ptr.items()}

    def mapped_base(self) -> int:
        """Address at which llama.cpp mapped the base file (offset 0), from a bound expert tensor."""
        key, st = next(iter(self._orig.items()))
        return st.data - self.index.base_tensors[base_expert_name(*key)].offset

    def set_layer(self, layer: int, tier: int) -> bool:
        """Point all experts of ``layer`` at sidecar tier ``tier`` (or BASE); True if it changed."""
        if self.layer_tier.get(layer) == tier:
            return False
        for m in MATRICES:
            ptr = self._ptr[(layer, m)]
            t = tensor_at(ptr)
            if tier == BASE:
                self._orig[(layer, m)].write(t)
                continue
            v = self.index.layer_view(layer, m, self.index.tiers[tier])
            row = row_bytes(v.ggml_type, v.shape[1])
            type_size = GGML_QUANT_SIZES[v.ggml_type][1]
            TensorState(int(v.ggml_type), (type_size, row, v.stride, v.stride * v.n_expert),
                        self.mappings[tier].addr + v.offset).write(t)
        self.layer_tier[layer] = tier
        self.changes += 1
        return True

    def set_experts(self, layer: int, tiers: np.ndarray, only: np.ndarray | None = None) -> int:
        """Per-expert mode: expert e of ``layer`` reads tier ``tiers[e]``; returns how many changed."""
        assert self.patch is not None and self.expert_tier is not None
        n = 0
        experts = range(self.index.n_expert) if only is None else np.unique(only)
        for e in experts:
            tier = int(tiers[e])
            if self.expert_tier[layer, e] == tier:
                continue
            if tier == BASE:
                for m in MATRICES:
                    self.patch.drop(self._ptr[(layer, m)], int(e))
                self.expert_tier[layer, e] = tier
                n += 1
                continue
            for m in MATRICES:
                s = self.index.slice(layer, m, int(e), self.index.tiers[tier])
                self.patch.set(self._ptr[(layer, m)], int(e), int(s.ggml_type), self.mappings[tier].addr + s.offset,
                               row_bytes(s.ggml_type, s.shape[1]))
            self.expert_tier[layer, e] = tier
            n += 1
        self.changes += n
        return n

    def restore(self) -> None:
        """Write every original tensor state back (bit-exact) and drop per-expert views."""
        if self.patch is not None:
            for ptr in self._ptr.values():
                self.patch.clear(ptr)
        for key, ptr in self._ptr.items():
            self._orig[key].write(tensor_at(ptr))
        self.layer_tier = {layer: BASE for layer in self.layer_tier}
        if self.expert_tier is not None:
            self.expert_tier[:] = BASE
