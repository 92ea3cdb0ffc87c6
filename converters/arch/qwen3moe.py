"""Qwen3-MoE (``Qwen3MoeForCausalLM``): per-head q/k RMS norms, normalised top-k weights."""

from __future__ import annotations

import gguf

from dymoe_gguf.converters.arch._common import ArchSpec

SPEC = ArchSpec(
    name="qwen3moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    model_arch=gguf.MODEL_ARCH.QWEN3MOE,
)
