"""--tensor-type and --imatrix: what the plan allows is what llama.cpp runs; everything else is refused up front."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from dymoe_gguf._native.llama import open_llama
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.cli import cli
from dymoe_gguf.convert import convert
from dymoe_gguf.convert.imatrix import write_imatrix
from dymoe_gguf.convert.plan import NEEDS_IMATRIX, WEIGHT_TYPES
from tests.convert.test_output import one_line_error

QT = gguf.GGMLQuantizationType
TOKENS = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


def logits(path: Path, tokens=TOKENS) -> np.ndarray:
    llm = open_llama(path, n_ctx=64, n_batch=64, logits_all=True, n_threads=2)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def base_types(out: Path) -> dict[str, QT]:
    return {t.name: t.ggml_type for t in BundleIndex(out).base_tensors.values()}


def test_readme_tensor_type_example_keeps_norms_f32_and_runs(tmp_path, hf_model):
    """'attn_.*=Q4_K' (README, convert --help) also matches attn_norm and the q/k norms: they stay F32."""
    res = CliRunner().invoke(cli, ["convert", str(hf_model("qwen3moe")), "-o", str(tmp_path / "b"), "-q",
                                   "--tensor-type", "attn_.*=Q4_K"])
    assert res.exit_code == 0, res.output
    types = base_types(tmp_path / "b")
    assert types["blk.0.attn_norm.weight"] == QT.F32 and types["blk.1.attn_k_norm.weight"] == QT.F32
    assert types["blk.0.attn_q.weight"] == QT.Q4_K and types["blk.1.attn_output.weight"] == QT.Q4_K
    assert "6 more it matches (norms, routers, biases, 1-D) keep their type" in res.output
    assert np.isfinite(logits(tmp_path / "b" / "model.gguf")).all()
    run = CliRunner().invoke(cli, ["run", str(tmp_path / "b"), "-p", "Hello", "-n", "4"])
    assert run.exit_code == 0, run.output


def test_f32_override_is_not_dropped(tmp_path, hf_model):
    convert(hf_model("qwen3moe"), tmp_path / "b", base_tier=Tier.Q4_K, tiers=(Tier.Q8_0,), threads=2,
            tensor_types=("^output\\.weight$=F32", "token_embd=F16"))
    types = base_types(tmp_path / "b")
    assert types["output.weight"] == QT.F32 and types["token_embd.weight"] == QT.F16
    assert types["blk.0.attn_q.weight"] == QT.Q8_0  # the default for matrices of a quantized base


def test_routers_norms_and_biases_are_never_retyped(tmp_path, hf_model):
    res = convert(hf_model("qwen2moe"), tmp_path / "b", base_tier=Tier.F32, tiers=(Tier.Q8_0,), threads=2,
                  tensor_types=(".*=Q8_0",))
    for t in res.plan.base.tensors:
        fixed = len(t.shape) == 1 or any(k in t.name for k in ("_norm", ".bias", "ffn_gate_inp"))
        if fixed:
            assert t.qtype == QT.F32, t.name
    assert any(t.name.endswith(".bias") for t in res.plan.base.tensors)  # qwen2moe has q/k/v biases
    assert np.isfinite(logits(tmp_path / "b" / "model.gguf")).all()


def test_override_matching_only_fixed_tensors_warns(tmp_path, hf_model):
    res = convert(hf_model("qwen3moe"), tmp_path / "b", base_tier=Tier.Q4_K, tiers=(Tier.Q8_0,), dry_run=True,
                  tensor_types=("norm=Q4_K",))
    assert any("retypes no tensor" in w and "never retyped" in w for w in res.plan.warnings)


@pytest.mark.parametrize("spec, needle", [
    (".*=Q8_K", "not a type llama.cpp can store weights in"),
    (".*=I32", "not a type llama.cpp can store weights in"),
    (".*=Q4_K_M", "not a ggml type"),
    ("attn_q", "PATTERN=TYPE"),
    ("=Q4_K", "non-empty PATTERN"),
    ("attn_(=Q4_K", "Invalid --tensor-type pattern"),
])
def test_bad_tensor_types_are_refused_at_plan_time(tmp_path, hf_model, spec, needle):
    for extra in ((), ("--dry-run",)):
        res = CliRunner().invoke(cli, ["convert", str(hf_model("qwen3moe")), "-o", str(tmp_path / "b"), "-q",
                                       "--tensor-type", spec, *extra])
        one_line_error(res, needle)
    assert not (tmp_path / "b").exists()


def test_iq_types_need_an_imatrix_covering_the_tensor(tmp_path, hf_model):
    src = hf_model("qwen3moe")
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "b"), "-q", "--dry-run",
                                   "--tensor-type", ".*=IQ2_XXS"])
    one_line_error(res, "IQ2_XXS needs an importance matrix for token_embd.weight")
    # an imatrix of the experts only (what `calibrate --imatrix` writes) does not cover attention
    sums = {f"blk.{lay}.ffn_{m}_exps.weight": np.ones((8, 256), np.float32) for lay in range(2)
            for m in ("gate", "up", "down")}
    write_imatrix(tmp_path / "experts.imatrix", sums, {k: np.ones(8) for k in sums}, "t", 1, 8)
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "b"), "-q", "--imatrix",
                                   str(tmp_path / "experts.imatrix"), "--tensor-type", "attn_q=IQ1_S"])
    one_line_error(res, "IQ1_S needs an importance matrix for blk.0.attn_q.weight: --imatrix experts.imatrix has no")
    assert not (tmp_path / "b").exists()


def test_imatrix_of_another_model_is_a_one_line_error(tmp_path, hf_model):
    src = hf_model("qwen3moe")
    other = {f"blk.{lay}.ffn_{m}_exps.weight": np.ones((8, 512), np.float32) for lay in range(2)
             for m in ("gate", "up", "down")}  # same names, other width
    write_imatrix(tmp_path / "wide.gguf", other, {k: np.ones(8) for k in other}, "t", 1, 8)
    foreign = {f"model.layers.{lay}.mlp.w{i}": np.ones((1, 64), np.float32) for lay in range(3) for i in range(3)}
    write_imatrix(tmp_path / "foreign.gguf", foreign, {k: np.ones(1) for k in foreign}, "t", 1, 8)
    for path, needle in ((tmp_path / "wide.gguf", "does not fit this model"),
                         (tmp_path / "foreign.gguf", "is for another model"),
                         (hf_model("qwen3moe") / "config.json", "Corrupt imatrix"),
                         (tmp_path, "is not a file"),
                         (tmp_path / "nope.gguf", "does not exist")):
        for extra in ((), ("--dry-run",)):
            res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "b"), "-q", "--imatrix",
                                           str(path), *extra])
            one_line_error(res, needle)
    assert not (tmp_path / "b").exists()


def test_ggml_requires_imatrix_for_exactly_these_types():
    from dymoe_gguf._native import ggml

    lib = ggml.base()
    assert {q for q in WEIGHT_TYPES if lib.ggml_quantize_requires_imatrix(int(q))} == set(NEEDS_IMATRIX)


@pytest.mark.slow
def test_every_allowed_weight_type_runs_in_llama_cpp(tmp_path, hf_model):
    """Each type --tensor-type accepts is quantized by ggml and multiplied/looked up by llama.cpp's CPU backend."""
    src = tmp_path / "src"
    shutil.copytree(hf_model("qwen3moe"), src)
    matrices = ["token_embd", "output"] + [f"blk.{lay}.attn_{m}" for lay in range(2) for m in ("q", "k", "v", "output")]
    imat = {f"{m}.weight": np.ones((1, 256), np.float32) for m in matrices}
    write_imatrix(tmp_path / "imatrix.gguf", imat, {k: np.ones(1) for k in imat}, "t", 1, 8)
    types = [q for q in WEIGHT_TYPES if q != QT.F32]
    for i in range(0, len(types), len(matrices)):
        chunk = types[i:i + len(matrices)]
        specs = tuple(f"^{m.replace('.', '[.]')}[.]weight$={q.name}" for m, q in zip(matrices, chunk))
        out = tmp_path / f"b{i}"
        convert(src, out, base_tier=Tier.Q4_K, tiers=(Tier.Q2_K,), threads=2, tensor_types=specs,
                imatrix=tmp_path / "imatrix.gguf")
        got = base_types(out)
        assert [got[f"{m}.weight"] for m in matrices[:len(chunk)]] == chunk
        assert np.isfinite(logits(out / "model.gguf")).all(), chunk
