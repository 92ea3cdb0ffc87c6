"""Synthetic MoE checkpoints in the real Hugging Face layout (numpy + safetensors, no torch).

Used by the tests (tiny models of each architecture), by ``bench`` (OLMoE-shaped models larger than
the memory cap) and by the demo before a trained model is present.

Routing statistics are planted, each by one knob of :class:`SynthConfig`:

* **load skew** (``skew``): every token embedding shares a direction ``u`` and each router row gets a
  Zipf-weighted multiple of it, so some experts are chosen far more often than others;
* **how much each layer changes the residual stream** (``residual_scale``): the attention output
  projection and the experts' down projections are scaled by it. Random full-size updates (1.0) turn
  the hidden state over from layer to layer, so the next layer's router applied to this layer's hidden
  state (look-ahead) names about half of its experts; trained MoEs change it slowly (small values);
* **cross-layer router correlation** (``router_corr``): each layer's random router rows are an AR(1)
  continuation of the previous layer's, correlation ``router_corr``, so one layer's choice predicts
  the next one's;
* **gate sharpness** (``router_logit_std``): the router is scaled so a normalised hidden state gives
  logits of this standard deviation (before skew); it changes the gate weights, not which experts are
  selected (a top-k is scale-invariant). ``None`` keeps the unscaled router (std 0.5·√d: near one-hot).

The defaults reproduce the original random model bit for bit (the tests' models and the bench's
"random" model); :data:`REALISTIC` holds the values the bench uses for its default, realistic model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ARCH = {
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "olmoe": ("OlmoeForCausalLM", "olmoe"),
}


@dataclass(frozen=True)
class SynthConfig:
    """Shape and randomness of a synthetic MoE."""

    arch: str = "qwen3moe"
    n_layer: int = 2
    d: int = 256
    ff: int = 256  # expert width
    n_expert: int = 8
    top_k: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    vocab: int = 512  # byte-level BPE: 256 byte tokens, the rest padding
    shared_ff: int = 256  # qwen2moe shared expert width
    skew: float = 3.0  # router skew strength (0 = uniform routing)
    residual_scale: float = 1.0  # scale of each layer's attention / expert outputs added to the residual stream
    router_corr: float = 0.0  # correlation of a layer's random router rows with the previous layer's
    router_logit_std: float | None = None  # router logits' std on a normalised hidden state (None: 0.5·sqrt(d))
    fused_experts: bool = False  # transformers>=5 layout: experts.gate_up_proj / experts.down_proj
    dtype: str = "float16"  # stored dtype: float32 | float16 | bfloat16
    seed: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.router_corr < 1:
            raise ValueError(f"Expected router_corr in [0, 1), got {self.router_corr}")
        if self.residual_scale <= 0 or (self.router_logit_std is not None and self.router_logit_std <= 0):
            raise ValueError("Expected residual_scale and router_logit_std > 0")
        if self.arch == "olmoe":  # llama.cpp's olmoe sizes k_norm by n_embd: multi-head attention only
            object.__setattr__(self, "n_head_kv", self.n_head)


# The original random model (the SynthConfig defaults), as knobs.
RANDOM: dict = {"skew": 3.0, "residual_scale": 1.0, "router_corr": 0.0, "router_logit_std": None}
# Routing like the trained model's (models/tiny-moe), measured through calibrate and the controller's
# look-ahead (scripts/bench_routing.py): next-layer look-ahead recall 0.92 (trained: 0.91-0.92) and a
# load skew whose normalised entropy *above the top-k floor* matches the trained model's (tiny-moe, 8
# experts top-2: 0.60 on average, 0.40 of the way from log k to log E; on 64 experts top-8 that is 0.70:
# measured 0.66 / 0.70 / 0.73). Chosen on the OLMoE shape (d=2048, ff 1024, 64 experts top-8, 3 layers;
# the statistics depend on d, so smaller test models differ). Cross-layer predictability (calibrate's
# transition, 0.80) already exceeds the trained model's 0.71 without router correlation, so router_corr
# stays 0. docs/BENCH.md has the measurements.
REALISTIC: dict = {"skew": 7.0, "residual_scale": 0.9, "router_corr": 0.0, "router_logit_std": 1.5}


def _store(a: np.ndarray, dtype: str) -> np.ndarray:
    a = a.astype(np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16)
    # bfloat16 as raw uint16 (round to nearest even); safetensors writes it with dtype BF16 below
    u = a.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _scaled(a: np.ndarray, scale: float) -> np.ndarray:
    """``a * scale`` in float32; ``a`` itself when ``scale`` is 1 (the original model, bit for bit)."""
    return a if scale == 1.0 else (a * np.float32(scale)).astype(np.float32)


def make_weights(c: SynthConfig, on_layer: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in HF naming, float32 (``on_layer(i)`` after each layer: progress)."""
    rng = np.random.default_rng(c.seed)
    hd = c.d // c.n_head
    u = rng.standard_normal(c.d).astype(np.float32)
    u /= np.linalg.norm(u)

    def mat(rows: int, cols: int, scale: float | None = None) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * (scale or cols**-0.5)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    w["model.embed_tokens.weight"] = mat(c.vocab, c.d, 1.0) + 2.0 * u
    zipf = 1.0 / np.arange(1, c.n_expert + 1)
    # router_logit_std: scale the whole router (noise and skew alike, so selection does not change)
    r_scale = 1.0 if c.router_logit_std is None else c.router_logit_std / (0.5 * np.sqrt(c.d))
    noise_prev: np.ndarray | None = None
    for layer in range(c.n_layer):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = np.ones(c.d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(c.d, np.float32)
        w[p + "self_attn.q_proj.weight"] = mat(c.n_head * hd, c.d)
        w[p + "self_attn.k_proj.weight"] = mat(c.n_head_kv * hd, c.d)
        w[p + "self_attn.v_proj.weight"] = mat(c.n_head_kv * hd, c.d)
        w[p + "self_attn.o_proj.weight"] = _scaled(mat(c.d, c.n_head * hd), c.residual_scale)
        if c.arch == "qwen2moe":
            for n, rows in (("q", c.n_head * hd), ("k", c.n_head_kv * hd), ("v", c.n_head_kv * hd)):
                w[p + f"self_attn.{n}_proj.bias"] = (rng.standard_normal(rows) * 0.02).astype(np.float32)
        if c.arch == "qwen3moe":
            w[p + "self_attn.q_norm.weight"] = np.ones(hd, np.float32)
            w[p + "self_attn.k_norm.weight"] = np.ones(hd, np.float32)
        if c.arch == "olmoe":
            w[p + "self_attn.q_norm.weight"] = np.ones(c.n_head * hd, np.float32)
            w[p + "self_attn.k_norm.weight"] = np.ones(c.n_head_kv * hd, np.float32)
        moe = p + ("block_sparse_moe." if c.arch == "mixtral" else "mlp.")
        order = rng.permutation(c.n_expert)  # which expert is hot differs per layer
        noise = mat(c.n_expert, c.d, 1.0)  # (E, d) unit-variance rows
        if c.router_corr and noise_prev is not None:  # AR(1) across layers: corr(layer, layer - 1) = router_corr
            noise = (c.router_corr * noise_prev + np.sqrt(1 - c.router_corr ** 2) * noise).astype(np.float32)
        noise_prev = noise
        router = noise * 0.5 + (c.skew * zipf[order] * np.sqrt(c.d))[:, None] * u[None, :]
        w[moe + "gate.weight"] = _scaled(router.astype(np.float32), r_scale)
        gate = [mat(c.ff, c.d) for _ in range(c.n_expert)]
        up = [mat(c.ff, c.d) for _ in range(c.n_expert)]
        down = [_scaled(mat(c.d, c.ff), c.residual_scale) for _ in range(c.n_expert)]
        if c.fused_experts:
            w[moe + "experts.gate_up_proj"] = np.stack([np.concatenate([g, u_], 0) for g, u_ in zip(gate, up)])
            w[moe + "experts.down_proj"] = np.stack(down)
        else:
            names = ("w1", "w3", "w2") if c.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            for e in range(c.n_expert):
                w[moe + f"experts.{e}.{names[0]}.weight"] = gate[e]
                w[moe + f"experts.{e}.{names[1]}.weight"] = up[e]
                w[moe + f"experts.{e}.{names[2]}.weight"] = down[e]
        if c.arch == "qwen2moe":
            w[moe + "shared_expert.gate_proj.weight"] = mat(c.shared_ff, c.d)
            w[moe + "shared_expert.up_proj.weight"] = mat(c.shared_ff, c.d)
            w[moe + "shared_expert.down_proj.weight"] = _scaled(mat(c.d, c.shared_ff), c.residual_scale)
            w[moe + "shared_expert_gate.weight"] = mat(1, c.d)
        if on_layer is not None:
            on_layer(layer)
    w["model.norm.weight"] = np.ones(c.d, np.float32)
    w["lm_head.weight"] = mat(c.vocab, c.d)
    return w


def make_config(c: SynthConfig) -> dict:
    """config.json for the synthetic model."""
    hf_arch, model_type = _ARCH[c.arch]
    cfg = {
        "architectures": [hf_arch], "model_type": model_type, "hidden_size": c.d,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head_kv,
        "vocab_size": c.vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "num_experts_per_tok": c.top_k, "bos_token_id": 256, "eos_token_id": 256,
    }
    if c.arch == "mixtral":
        cfg |= {"num_local_experts": c.n_expert, "intermediate_size": c.ff}
    elif c.arch == "olmoe":
        cfg |= {"num_experts": c.n_expert, "intermediate_size": c.ff, "norm_topk_prob": False}
    else:
        cfg |= {"num_experts": c.n_expert, "moe_intermediate_size": c.ff, "intermediate_size": 4 * c.ff,
                "norm_topk_prob": c.arch == "qwen3moe", "decoder_sparse_step": 1, "mlp_only_layers": []}
        if c.arch == "qwen3moe":
            cfg["head_dim"] = c.d // c.n_head
        else:
            cfg["shared_expert_intermediate_size"] = c.shared_ff
    return cfg


def byte_bpe_tokenizer() -> dict:
    """A minimal byte-level BPE tokenizer.json (256 byte tokens, no merges, one special token)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = dict(zip(bs, (chr(c) for c in cs)))
    vocab = {byte_to_char[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a")]
    for i, (a, b) in enumerate(merges):
        vocab[a + b] = 257 + i
    regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return {
        "version": "1.0",
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


def write_checkpoint(out: Path, c: SynthConfig, tokenizer_json: dict | None = None, progress: bool = False) -> Path:
    """Write config.json, safetensors (sharded if ``c.shards > 1``) and tokenizer files into ``out``.

    ``progress``: a tqdm bar over the layers being generated (on stderr)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(make_config(c), indent=2))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=c.n_layer, unit="layer", desc="generating weights", leave=False)
    try:
        weights = make_weights(c, on_layer=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    names = list(weights)
    chunks = [names[i::c.shards] for i in range(c.shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = "model.safetensors" if c.shards == 1 else f"model-{i + 1:05d}-of-{c.shards:05d}.safetensors"
        tensors = {n: _store(weights[n], c.dtype) for n in chunk}
        save_file(tensors, str(out / fname))
        if c.dtype == "bfloat16":
            _retag_bf16(out / fname)
        weight_map |= {n: fname for n in chunk}
    if c.shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json or byte_bpe_tokenizer()))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": 2048}))
    return out


def _retag_bf16(path: Path) -> None:
    """safetensors.numpy stores uint16 as U16; rewrite the header with dtype BF16 (data unchanged)."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] == "U16":
            info["dtype"] = "BF16"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def write_synthetic(out: Path, c: SynthConfig, force: bool = False, progress: bool = False) -> Path:
    """Write a synthetic checkpoint atomically (temporary directory, then rename)."""
    import shutil
    import uuid

    from dymoe_gguf.errors import OutputError

    if out.exists() and not force:
        raise OutputError(f"Output {out} already exists: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        write_checkpoint(tmp, c, progress=progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
