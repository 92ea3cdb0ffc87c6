"""Qwen1.5/Qwen2-MoE (``Qwen2MoeForCausalLM``): routed experts plus a gated shared expert."""

from __future__ import annotations

import gguf

from dymoe_gguf.converters.arch._common import ArchSpec

SPEC = ArchSpec(
    name="qwen2moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    model_arch=gguf.MODEL_ARCH.QWEN2MOE,
    shared_ff_key="shared_expert_intermediate_size",
)
