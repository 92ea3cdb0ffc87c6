"""How much memory a bundle needs under llama.cpp with the dymoe controller: one home for the arithmetic.

All in bytes; ``inspect`` shows them and the runtime's ``--budget auto`` and its refusal of budgets
below the minimum use the same functions.

* **dense** = the base file's non-expert tensors (embeddings, attention, norms, routers, shared
  experts, output): read for every token, so always resident.
* **KV cache** for ``n_ctx`` tokens = ``n_layer × pad256(n_ctx) × n_head_kv × (key_length +
  value_length) × 2``: llama.cpp's default F16 K and V caches, ``n_ctx`` rounded up to a multiple of
  256 as ``llama_context`` does.
* **minimum expert working set** for a batch of ``n_batch`` tokens = the largest, over MoE layers,
  sum of the ``min(n_expert, n_batch × top_k)`` biggest experts of that layer (gate + up + down) at the
  lowest tier: the experts one batch can route to in one layer, all read while that layer's matmuls
  run. ``n_batch`` defaults to llama.cpp's 512 (a prompt batch); a decode step alone needs ``top_k``.
* **minimum RAM** = dense + KV(training context) + minimum working set: below this, some layer's
  experts are evicted while still in use and every batch re-reads them.
* **comfortable RAM** = dense + KV(training context) + every expert at the base tier (the base file
  fully resident; nothing is ever re-read).

* **auto budget** (``--budget auto``) = available RAM − dense − KV(n_ctx) − margin, the margin being
  ``AUTO_MARGIN`` of available RAM plus ``AUTO_RESERVE`` (llama.cpp's compute buffers, Python, other
  processes' page cache); never below the minimum working set of one ``n_batch`` batch.

Not counted: llama.cpp's compute buffers (activations of one batch and the logits), the Python
process itself, and the page cache's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dymoe_gguf.bundle.format import is_expert_tensor
from dymoe_gguf.bundle.index import BundleIndex

DEFAULT_N_BATCH = 512  # llama.cpp's (and llama-cpp-python's) default n_batch / n_ubatch
KV_BYTES_PER_VALUE = 2  # F16 K and V caches, llama.cpp's default type_k / type_v
KV_PAD = 256  # llama_context rounds n_ctx up to a multiple of this
AUTO_MARGIN = 0.15  # share of available RAM --budget auto leaves to everything else
AUTO_RESERVE = 256 << 20  # plus this: compute buffers, the Python process


@dataclass(frozen=True)
class MemoryEstimate:
    """The terms of a bundle's memory need and their sums (see the module docstring)."""

    dense_bytes: int
    kv_bytes: int
    n_ctx: int
    working_set_bytes: int
    n_batch: int
    all_experts_base_bytes: int

    @property
    def minimum_bytes(self) -> int:
        return self.dense_bytes + self.kv_bytes + self.working_set_bytes

    @property
    def comfortable_bytes(self) -> int:
        return self.dense_bytes + self.kv_bytes + self.all_experts_base_bytes

    def to_dict(self) -> dict[str, int]:
        return {"dense_bytes": self.dense_bytes, "kv_bytes": self.kv_bytes, "n_ctx": self.n_ctx,
                "working_set_bytes": self.working_set_bytes, "n_batch": self.n_batch,
                "all_experts_base_bytes": self.all_experts_base_bytes, "minimum_bytes": self.minimum_bytes,
                "comfortable_bytes": self.comfortable_bytes}


def dense_bytes(index: BundleIndex) -> int:
    """Bytes of the base file's non-expert tensors."""
    return sum(t.nbytes for t in index.base_tensors.values() if not is_expert_tensor(t.name))


def base_expert_bytes(index: BundleIndex) -> int:
    """Bytes of every expert at the base tier (the base file's 3-D expert tensors)."""
    return sum(t.nbytes for t in index.base_tensors.values() if is_expert_tensor(t.name))


def kv_cache_bytes(index: BundleIndex, n_ctx: int) -> int:
    """llama.cpp's default (F16) KV cache for ``n_ctx`` tokens."""
    hp = index.hparams
    n_ctx = -(-max(1, n_ctx) // KV_PAD) * KV_PAD
    per_token = int(hp["n_head_kv"]) * (int(hp["key_length"]) + int(hp["value_length"])) * KV_BYTES_PER_VALUE
    return int(hp["n_layer"]) * n_ctx * per_token


def working_set_bytes(index: BundleIndex, n_batch: int = DEFAULT_N_BATCH) -> int:
    """The experts one MoE layer can need for one batch of ``n_batch`` tokens, at the lowest tier."""
    top_k = max(1, int(index.hparams["n_expert_used"]))
    n = min(index.n_expert, max(1, n_batch) * top_k)
    lowest = index.expert_bytes()[:, :, 0]  # [n_layer, n_expert], tiers sorted low -> high
    per_layer = -np.sort(-lowest, axis=1)[:, :n].sum(axis=1)
    return int(per_layer.max(initial=0))


def estimate(index: BundleIndex, n_ctx: int | None = None, n_batch: int = DEFAULT_N_BATCH) -> MemoryEstimate:
    """Every term, with the KV cache for ``n_ctx`` (default: the model's training context)."""
    ctx = n_ctx if n_ctx is not None else int(index.hparams["context_length"]) or 4096
    return MemoryEstimate(dense_bytes(index), kv_cache_bytes(index, ctx), ctx, working_set_bytes(index, n_batch),
                          n_batch, base_expert_bytes(index))


def auto_budget(index: BundleIndex, n_ctx: int, n_batch: int, available: int) -> int:
    """The resident-expert budget ``--budget auto`` gives, with ``available`` bytes of RAM free now."""
    spare = available - dense_bytes(index) - kv_cache_bytes(index, n_ctx) - int(available * AUTO_MARGIN) - AUTO_RESERVE
    return max(spare, working_set_bytes(index, n_batch))
