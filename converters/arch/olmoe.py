"""OLMoE (``OlmoeForCausalLM``): full-width q/k norms, unnormalised top-k weights."""

from __future__ import annotations

import gguf

from dymoe_gguf.converters.arch._common import ArchSpec

SPEC = ArchSpec(
    name="olmoe",
    hf_architectures=("OlmoeForCausalLM",),
    model_arch=gguf.MODEL_ARCH.OLMOE,
    expert_ff_key=None,  # OLMoE's intermediate_size is the expert width
)
