"""Converting tiny checkpoints of every supported architecture, checked against independent references."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from dymoe_gguf._native import ggml
from dymoe_gguf._native.llama import open_llama
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.bundle.format import MATRICES
from dymoe_gguf.converters import open_source
from tests.conftest import ARCHS
from tests.reference import expert, forward

TOKENS = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


def llama_logits(path, tokens, n_threads=2) -> np.ndarray:
    llm = open_llama(path, n_ctx=64, n_batch=64, logits_all=True, n_threads=n_threads)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def source_weights(src) -> tuple[dict[str, np.ndarray], dict]:
    """HF weights as float32, read back from the checkpoint on disk (what the converter saw)."""
    from dymoe_gguf.converters.safetensors_io import index_safetensors, load_f32

    files = sorted(src.glob("*.safetensors"))
    refs = index_safetensors(files)
    return {n: load_f32(r) for n, r in refs.items()}, json.loads((src / "config.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_numpy_reference(arch, bundle, hf_model):
    out = bundle(arch, base_tier=Tier.F32)
    w, cfg = source_weights(hf_model(arch))
    want = forward(w, cfg, TOKENS)
    got = llama_logits(out / "model.gguf", TOKENS)
    scale = np.abs(want).max()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-3 * scale, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_base_loads_and_generates(arch, bundle):
    out = bundle(arch, base_tier=Tier.Q4_K)
    idx = BundleIndex(out)
    assert idx.base_tier == Tier.Q4_K and idx.tiers == (Tier.Q2_K, Tier.Q4_K, Tier.Q8_0)
    llm = open_llama(out / "model.gguf", n_ctx=128, n_threads=2)
    try:
        text = llm.create_completion("Hello", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        assert llm.n_tokens > 1 and isinstance(text, str)
    finally:
        llm.close()


def test_sidecar_bytes_are_ggml_quantized_source_and_aligned(bundle, hf_model):
    out = bundle("qwen3moe", base_tier=Tier.Q4_K)
    idx = BundleIndex(out)
    src = open_source(hf_model("qwen3moe"))
    by_name = {t.name: t for t in src.tensors}
    for layer in idx.moe_layers:
        for m in MATRICES:
            t = by_name[f"blk.{layer}.ffn_{m}_exps.weight"]
            for tier in idx.tiers:
                view = idx.layer_view(layer, m, tier)
                assert view.stride % 16384 == 0 and view.offset % 16384 == 0
                for e in (0, idx.n_expert - 1):
                    s = idx.slice(layer, m, e, tier)
                    assert s.offset == view.offset + e * view.stride
                    raw = np.fromfile(s.file, dtype=np.uint8, count=s.nbytes, offset=s.offset)
                    assert np.array_equal(raw, ggml.quantize(t.load_expert(e), tier.ggml_type))
    # the base file's Q4_K experts are the same bytes as the Q4_K sidecar's
    base = idx.base_tensors["blk.1.ffn_down_exps.weight"]
    per = base.nbytes // idx.n_expert
    s = idx.slice(1, "down", 3, Tier.Q4_K)
    a = np.fromfile(idx.base_path, dtype=np.uint8, count=per, offset=base.offset + 3 * per)
    assert np.array_equal(a, np.fromfile(s.file, dtype=np.uint8, count=s.nbytes, offset=s.offset))


def test_tier_errors_are_ordered(bundle, hf_model):
    out = bundle("mixtral", base_tier=Tier.F32)
    idx = BundleIndex(out)
    w, cfg = source_weights(hf_model("mixtral"))
    errs = {}
    for tier in idx.tiers:
        rel = []
        for e in range(idx.n_expert):
            s = idx.slice(0, "gate", e, tier)
            raw = np.fromfile(s.file, dtype=np.uint8, count=s.nbytes, offset=s.offset)
            deq = gguf.quants.dequantize(raw.reshape(s.shape[0], -1), tier.ggml_type)
            ref = expert(w, "model.layers.0.block_sparse_moe.", e, "mixtral", 8, cfg)[0]
            rel.append(np.sqrt(((deq - ref) ** 2).mean() / (ref**2).mean()))
        errs[tier] = float(np.mean(rel))
    assert errs[Tier.Q8_0] < errs[Tier.Q4_K] < errs[Tier.Q2_K]
    assert errs[Tier.Q8_0] < 0.01 and errs[Tier.Q2_K] < 0.5


def test_sharded_bf16_fused_checkpoint(tmp_path, hf_model):
    from dymoe_gguf.convert import convert

    src = hf_model("qwen2moe", dtype="bfloat16", fused_experts=True, shards=3)
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "b"
    convert(src, out, base_tier=Tier.F32, tiers=(Tier.Q8_0,), threads=2)
    w, cfg = source_weights(src)  # the bf16-rounded weights, as stored
    assert "model.layers.0.mlp.experts.gate_up_proj" in w
    want = forward(w, cfg, TOKENS)
    got = llama_logits(out / "model.gguf", TOKENS)
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)


def test_gguf_source_requantizes_to_identical_tiers(tmp_path, bundle):
    from dymoe_gguf.convert import convert

    first = bundle("olmoe", base_tier=Tier.F32)
    out = tmp_path / "again"
    convert(first / "model.gguf", out, base_tier=Tier.Q8_0, tiers=(Tier.Q2_K, Tier.Q4_K), threads=2)
    a, b = BundleIndex(first), BundleIndex(out)
    assert b.source["kind"] == "gguf"
    for tier in (Tier.Q2_K, Tier.Q4_K):
        for e in range(a.n_expert):
            sa, sb = a.slice(1, "up", e, tier), b.slice(1, "up", e, tier)
            ra = np.fromfile(sa.file, dtype=np.uint8, count=sa.nbytes, offset=sa.offset)
            rb = np.fromfile(sb.file, dtype=np.uint8, count=sb.nbytes, offset=sb.offset)
            assert np.array_equal(ra, rb)
    assert llama_logits(out / "model.gguf", TOKENS[:4]).shape == (4, 512)


def test_fallback_for_rows_k_quants_cannot_take(tmp_path, hf_model):
    from dymoe_gguf.convert import convert

    src = hf_model("qwen3moe", ff=288)  # down rows of 288 values: not a multiple of 256
    res = convert(src, tmp_path / "b", base_tier=Tier.Q4_K, tiers=(Tier.Q2_K, Tier.Q8_0), threads=2)
    assert any("Q2_K -> IQ4_NL" in n for n in res.plan.notes)
    assert any("Q4_K -> Q5_0" in n for n in res.plan.notes)
    idx = BundleIndex(tmp_path / "b")
    assert idx.slice(0, "down", 0, Tier.Q2_K).ggml_type == gguf.GGMLQuantizationType.IQ4_NL
    assert idx.slice(0, "gate", 0, Tier.Q2_K).ggml_type == gguf.GGMLQuantizationType.Q2_K
    assert llama_logits(tmp_path / "b" / "model.gguf", TOKENS[:3]).shape[0] == 3


def test_imatrix_changes_quantization_toward_important_columns(tmp_path, hf_model):
    from dymoe_gguf.convert import convert
    from dymoe_gguf.convert.imatrix import write_imatrix

    src = hf_model("qwen3moe")
    imp = np.ones((8, 256), np.float32)
    imp[:, :32] = 1000.0  # first 32 input columns matter most
    sums = {f"blk.{lay}.ffn_{m}_exps.weight": imp * 10 for lay in range(2) for m in ("gate", "up", "down")}
    counts = {k: np.full(8, 10.0) for k in sums}
    write_imatrix(tmp_path / "imatrix.gguf", sums, counts, "synthetic", 1, 512)
    with_imat = convert(src, tmp_path / "a", base_tier=Tier.Q8_0, tiers=(Tier.Q2_K,), threads=2,
                        imatrix=tmp_path / "imatrix.gguf")
    convert(src, tmp_path / "b", base_tier=Tier.Q8_0, tiers=(Tier.Q2_K,), threads=2)
    assert with_imat.plan.tiers == (Tier.Q2_K,)
    t = next(t for t in open_source(src).tensors if t.name == "blk.0.ffn_gate_exps.weight")
    ref = t.load_expert(0)
    errs = []
    for name in ("a", "b"):
        s = BundleIndex(tmp_path / name).slice(0, "gate", 0, Tier.Q2_K)
        raw = np.fromfile(s.file, dtype=np.uint8, count=s.nbytes, offset=s.offset)
        deq = gguf.quants.dequantize(raw.reshape(s.shape[0], -1), gguf.GGMLQuantizationType.Q2_K)
        errs.append(float(((deq - ref)[:, :32] ** 2).mean()))
    assert errs[0] < errs[1]
