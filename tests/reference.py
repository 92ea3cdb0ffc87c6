"""A numpy forward pass with Hugging Face semantics, on the HF weights — the converter's referee.

Independent of llama.cpp and of the converter: rotate-half rope on the original (unpermuted) q/k,
each architecture's routing (softmax, top-k, optional renormalisation, qwen2moe's shared expert).
"""

from __future__ import annotations

import numpy as np


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    # x: (T, H, hd); HF rotate_half convention
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # (T, hd/2)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rot = np.concatenate([-x2, x1], -1)
    return (x * cos + rot * sin).astype(np.float32)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(w: dict[str, np.ndarray], cfg: dict, tokens: list[int]) -> np.ndarray:
    """Logits ``(T, vocab)`` for ``tokens`` (float32 weights in HF naming)."""
    arch = cfg["model_type"]
    d, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or d // nh
    eps = cfg["rms_norm_eps"]
    k = cfg["num_experts_per_tok"]
    n_exp = cfg.get("num_local_experts") or cfg["num_experts"]
    norm_topk = arch == "mixtral" or cfg.get("norm_topk_prob", False)
    T = len(tokens)
    pos = np.arange(T)
    x = w["model.embed_tokens.weight"][tokens].astype(np.float32)
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)

        def proj(n: str, h: np.ndarray = h, p: str = p) -> np.ndarray:
            y = h @ w[p + f"self_attn.{n}_proj.weight"].T
            b = w.get(p + f"self_attn.{n}_proj.bias")
            return y + b if b is not None else y

        q, kk, v = proj("q"), proj("k"), proj("v")
        if arch == "olmoe":
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
            kk = _rms(kk, w[p + "self_attn.k_norm.weight"], eps)
        q, kk, v = q.reshape(T, nh, hd), kk.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if arch == "qwen3_moe":
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
            kk = _rms(kk, w[p + "self_attn.k_norm.weight"], eps)
        q, kk = _rope(q, pos, cfg["rope_theta"]), _rope(kk, pos, cfg["rope_theta"])
        rep = nh // nkv
        kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        moe = p + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
        logits = h @ w[moe + "gate.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        out = np.zeros_like(x)
        for t in range(T):
            ws = probs[t, top[t]]
            if norm_topk:
                ws = ws / ws.sum()
            for e, g in zip(top[t], ws):
                gw, uw, dw = expert(w, moe, int(e), arch, n_exp, cfg)
                out[t] += g * ((_silu(h[t] @ gw.T) * (h[t] @ uw.T)) @ dw.T)
        if arch == "qwen2_moe":
            s = moe + "shared_expert."
            sh = _silu(h @ w[s + "gate_proj.weight"].T) * (h @ w[s + "up_proj.weight"].T)
            sh = sh @ w[s + "down_proj.weight"].T
            gate = 1.0 / (1.0 + np.exp(-(h @ w[moe + "shared_expert_gate.weight"].T)))
            out += gate * sh
        x = x + out
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def expert(w: dict[str, np.ndarray], moe: str, e: int, arch: str, n_exp: int, cfg: dict):
    """(gate, up, down) of expert ``e`` from per-expert or fused HF tensors."""
    if moe + "experts.gate_up_proj" in w:
        gu = w[moe + "experts.gate_up_proj"][e]
        ff = gu.shape[0] // 2
        return gu[:ff], gu[ff:], w[moe + "experts.down_proj"][e]
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    return tuple(w[moe + f"experts.{e}.{n}.weight"] for n in names)
