"""What the four supported MoE architectures share: hyper-parameters and the HF -> GGUF tensor map.

Each architecture module (``mixtral.py``, ``qwen2moe.py``, ``qwen3moe.py``, ``olmoe.py``) builds one
:class:`ArchSpec`; the differences are data (key names, which extras exist), not code paths.
Non-expert tensor names come from gguf's own ``TensorNameMap``; expert tensors are recognised here
because Hugging Face stores them per expert (``experts.{e}.gate_proj``) or fused
(``experts.gate_up_proj``), while GGUF stores one 3-D tensor per (layer, matrix).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from dymoe_gguf.errors import SourceError, UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face MoE architecture maps onto a llama.cpp architecture."""

    name: str  # our name, e.g. "mixtral"
    hf_architectures: tuple[str, ...]  # config.json "architectures" values
    model_arch: gguf.MODEL_ARCH  # llama.cpp architecture written to general.architecture
    # HF per-expert weight names, matrix -> name inside "...experts.{e}."
    expert_names: dict[str, str] = field(default_factory=lambda: {"gate": "gate_proj", "up": "up_proj",
                                                                  "down": "down_proj"})
    expert_prefix: str = "mlp.experts"  # HF module path of the experts inside a layer
    permute_qk: bool = False  # llama arch: HF rotate-half rope -> ggml "normal" rope
    expert_ff_key: str | None = "moe_intermediate_size"  # config key of the expert width
    shared_ff_key: str | None = None  # config key of the shared expert width (qwen2moe)
    extra_hparams: Callable[[gguf.GGUFWriter, dict[str, Any]], None] | None = None

    @property
    def gguf_arch(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]


def cfg_get(cfg: dict[str, Any], *keys: str, required: bool = True) -> Any:
    """First of ``keys`` present in ``cfg`` (text configs of VLMs nest under text_config)."""
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if required:
        raise SourceError(f"Invalid config.json: expected one of {', '.join(keys)}, found none")
    return None


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters the converter itself needs (the rest go straight into GGUF keys)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    vocab_size: int
    tie_embeddings: bool


def read_hparams(spec: ArchSpec, cfg: dict[str, Any]) -> HParams:
    """Validate and extract the converter's hyper-parameters from config.json."""
    n_expert = cfg_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", required=False)
    if not n_expert:
        raise UnsupportedModelError("The model is dense (config.json declares no experts): "
                                    "dymoe-gguf converts Mixture-of-Experts models only")
    try:
        n_embd = int(cfg_get(cfg, "hidden_size"))
        n_head = int(cfg_get(cfg, "num_attention_heads"))
        n_ff_exp = int(cfg_get(cfg, *(k for k in (spec.expert_ff_key, "intermediate_size") if k)))
        return HParams(
            n_layer=int(cfg_get(cfg, "num_hidden_layers")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(cfg_get(cfg, "num_key_value_heads", required=False) or n_head),
            n_expert=int(n_expert),
            n_expert_used=int(cfg_get(cfg, "num_experts_per_tok", "num_experts_per_token")),
            n_ff_exp=n_ff_exp,
            vocab_size=int(cfg_get(cfg, "vocab_size")),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (TypeError, ValueError) as exc:
        raise SourceError(f"Invalid config.json: {exc}") from None


def write_hparams(spec: ArchSpec, w: gguf.GGUFWriter, cfg: dict[str, Any], hp: HParams) -> None:
    """Write the llama.cpp hyper-parameter keys, the way convert_hf_to_gguf.py does."""
    w.add_block_count(hp.n_layer)
    w.add_context_length(int(cfg_get(cfg, "max_position_embeddings", required=False) or 4096))
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(int(cfg_get(cfg, "intermediate_size", required=False) or hp.n_ff_exp))
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg_get(cfg, "rms_norm_eps", required=False) or 1e-6))
    w.add_expert_count(hp.n_expert)
    w.add_expert_used_count(hp.n_expert_used)
    if spec.expert_ff_key and spec.expert_ff_key in cfg:
        w.add_expert_feed_forward_length(hp.n_ff_exp)
    if spec.shared_ff_key and cfg.get(spec.shared_ff_key):
        w.add_expert_shared_feed_forward_length(int(cfg[spec.shared_ff_key]))
    head_dim = cfg.get("head_dim")
    if head_dim is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_vocab_size(hp.vocab_size)
    if spec.extra_hparams is not None:
        spec.extra_hparams(w, cfg)


# --------------------------------------------------------------------------- tensor names

_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ExpertRef:
    """An HF tensor holding expert weights: one expert (``expert`` set) or all (fused, 3-D)."""

    layer: int
    matrix: str  # "gate" | "up" | "down" | "gate_up" (fused gate and up)
    expert: int | None


def classify_expert(spec: ArchSpec, hf_name: str) -> ExpertRef | None:
    """Recognise an expert weight by its HF name; None for every other tensor."""
    m = _LAYER_RE.match(hf_name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    prefixes = {spec.expert_prefix, "mlp.experts", "block_sparse_moe.experts"}
    for prefix in prefixes:
        if not rest.startswith(prefix + "."):
            continue
        tail = rest[len(prefix) + 1:].removesuffix(".weight")
        if tail in ("gate_up_proj", "down_proj"):  # fused layout (transformers >= 5)
            return ExpertRef(layer, "gate_up" if tail == "gate_up_proj" else "down", None)
        parts = tail.split(".")
        if len(parts) == 2 and parts[0].isdigit():
            inverse = {v: k for k, v in spec.expert_names.items()} | {
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
            if parts[1] in inverse:
                return ExpertRef(layer, inverse[parts[1]], int(parts[0]))
    return None


def map_name(spec: ArchSpec, n_layer: int, hf_name: str) -> str | None:
    """GGUF name of a non-expert HF tensor via gguf's TensorNameMap; None if unknown."""
    tmap = gguf.get_tensor_name_map(spec.model_arch, n_layer)
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo HF's rotate-half rope layout for ggml's interleaved rope (llama arch only)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def base_expert_name(layer: int, matrix: str) -> str:
    """GGUF name of the 3-D expert tensor of (layer, matrix)."""
    kind = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
            "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}[matrix]
    return gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"
