"""Mixtral (``MixtralForCausalLM``): llama.cpp's ``llama`` architecture with experts.

HF stores experts as ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate/up/down); q/k are permuted
for ggml's rope layout exactly as convert_hf_to_gguf.py does for llama.
"""

from __future__ import annotations

import gguf

from dymoe_gguf.converters.arch._common import ArchSpec

SPEC = ArchSpec(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    model_arch=gguf.MODEL_ARCH.LLAMA,
    expert_names={"gate": "w1", "up": "w3", "down": "w2"},
    expert_prefix="block_sparse_moe.experts",
    permute_qk=True,
    expert_ff_key=None,  # Mixtral's intermediate_size *is* the expert width
)
