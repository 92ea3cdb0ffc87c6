"""The GGUFs people have: quantized files (Q4_K_M, Q5_K_M, Q6_K, Q8_0), split files, and Hugging Face
repos of GGUFs picked as ``llama-cli -hf owner/repo:QUANT`` does, through huggingface-hub's offline cache."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from dymoe_gguf._native import ggml
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.bundle.format import DEFAULT_BASE_TIER, DEFAULT_TIERS, MATRICES
from dymoe_gguf.cli import cli
from dymoe_gguf.convert import convert
from tests.convert._gguf import fake_hub_cache, quantize_gguf
from tests.convert.test_output import one_line_error
from tests.convert.test_plan import logits

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, hf_model) -> Path:
    out = tmp_path_factory.mktemp("f32") / "b"
    convert(hf_model("qwen3moe"), out, base_tier=Tier.F32, tiers=(Tier.Q8_0,), threads=2)
    return out / "model.gguf"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory, f32_gguf) -> dict[str, Path]:
    """The files MoE users download, made here by ggml from the F32 model."""
    d = tmp_path_factory.mktemp("downloads")
    return {mix: quantize_gguf(f32_gguf, d / f"tiny-moe-{mix}.gguf", mix) for mix in ("Q4_K_M", "Q5_K_M", "Q6_K",
                                                                                    "Q8_0")}


def source_experts(path: Path) -> dict[str, tuple[QT, np.ndarray]]:
    r = gguf.GGUFReader(path, "r")
    return {t.name: (QT(t.tensor_type), np.asarray(t.data)) for t in r.tensors if "_exps" in t.name}


def read(s) -> np.ndarray:
    return np.fromfile(s.file, dtype=np.uint8, count=s.nbytes, offset=s.offset)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
def test_quantized_gguf_source(mix, tmp_path, downloads, caplog):
    """The tier of the source's own type is its bytes, unchanged; other tiers re-quantize its values."""
    src = downloads[mix]
    out = tmp_path / "b"
    with caplog.at_level(logging.WARNING, logger="dymoe_gguf"):
        res = convert(src, out, base_tier=DEFAULT_BASE_TIER, tiers=DEFAULT_TIERS, threads=2)
    idx = BundleIndex(out)
    experts = source_experts(src)
    copied = 0
    for layer in idx.moe_layers:
        for m in MATRICES:
            qsrc, data = experts[f"blk.{layer}.ffn_{m}_exps.weight"]
            for e in (0, idx.n_expert - 1):
                for tier in idx.tiers:
                    s = idx.slice(layer, m, e, tier)
                    got = read(s)
                    if s.ggml_type == qsrc:
                        assert np.array_equal(got, data[e].reshape(-1)), (layer, m, e, tier)
                        copied += 1
                    else:
                        deq = gguf.quants.dequantize(data[e], qsrc).astype(np.float32)
                        assert np.array_equal(got, ggml.quantize(deq, s.ggml_type))
    assert (copied > 0) == (mix in ("Q4_K_M", "Q8_0"))  # the default tiers have no Q5_K or Q6_K
    above = [w for w in res.plan.warnings if "adds bytes, not precision" in w]
    if mix == "Q8_0":
        assert not above
    else:  # Q8_0 is above every other source type
        assert above and all("tier Q8_0" in w for w in above) and "adds bytes, not precision" in caplog.text
    assert np.isfinite(logits(out / "model.gguf")).all()
    run = CliRunner().invoke(cli, ["run", str(out), "-p", "Hello", "-n", "4", "--budget", "1MiB"])
    assert run.exit_code == 0, run.output


def test_source_of_the_base_tier_type_is_copied_whole(tmp_path, downloads):
    """A Q8_0 file converted with base tier Q8_0: model.gguf holds exactly the source's tensors, so llama.cpp
    computes exactly the source's logits."""
    convert(downloads["Q8_0"], tmp_path / "b", base_tier=Tier.Q8_0, tiers=(Tier.Q2_K, Tier.Q8_0), threads=2)
    np.testing.assert_array_equal(logits(tmp_path / "b" / "model.gguf"), logits(downloads["Q8_0"]))


def test_requantize_reencodes_the_matching_tier(tmp_path, downloads):
    src = downloads["Q4_K_M"]
    res = convert(src, tmp_path / "b", base_tier=Tier.Q4_K, tiers=(Tier.Q4_K,), threads=2, requantize=True)
    assert not any("byte for byte" in n for n in res.plan.notes)
    qsrc, data = source_experts(src)["blk.0.ffn_gate_exps.weight"]
    assert qsrc == QT.Q4_K
    s = BundleIndex(tmp_path / "b").slice(0, "gate", 1, Tier.Q4_K)
    assert np.array_equal(read(s), ggml.quantize(gguf.quants.dequantize(data[1], QT.Q4_K), QT.Q4_K))


def test_split_gguf_source_reads_every_part(tmp_path, f32_gguf, downloads):
    (tmp_path / "split").mkdir()
    first = quantize_gguf(f32_gguf, tmp_path / "split" / "tiny-moe-Q8_0.gguf", "Q8_0", split_tensors=12)
    assert first.name == "tiny-moe-Q8_0-00001-of-00003.gguf"
    convert(first, tmp_path / "a", base_tier=Tier.Q8_0, tiers=(Tier.Q4_K,), threads=2)
    convert(downloads["Q8_0"], tmp_path / "b", base_tier=Tier.Q8_0, tiers=(Tier.Q4_K,), threads=2)
    np.testing.assert_array_equal(logits(tmp_path / "a" / "model.gguf"), logits(tmp_path / "b" / "model.gguf"))
    (tmp_path / "split" / "tiny-moe-Q8_0-00002-of-00003.gguf").unlink()
    res = CliRunner().invoke(cli, ["convert", str(first), "-o", str(tmp_path / "c"), "-q"])
    one_line_error(res, "part tiny-moe-Q8_0-00002-of-00003.gguf is missing")


def test_sidecar_or_imatrix_is_not_a_model_source(tmp_path, bundle):
    res = CliRunner().invoke(cli, ["convert", str(bundle("qwen3moe") / "experts.Q2_K.gguf"), "-o",
                                   str(tmp_path / "c"), "-q"])
    one_line_error(res, "not a model GGUF")


# --------------------------------------------------------------------------- Hugging Face repos of GGUFs

REV1, REV2 = "1" * 40, "2" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch, downloads) -> Path:
    cache = tmp_path / "hub"
    files = {f"tiny-moe-{mix}.gguf": p for mix, p in downloads.items() if mix != "Q6_K"}
    files["mmproj-tiny-moe-Q8_0.gguf"] = downloads["Q6_K"]  # a projector: never picked as the model
    fake_hub_cache(cache, "acme/tiny-moe-GGUF", files, rev=REV1)
    fake_hub_cache(cache, "acme/tiny-moe-GGUF", {"sub/tiny-moe-Q6_K.gguf": downloads["Q6_K"]}, rev=REV2, ref="v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def source_type(out: Path) -> str:
    return BundleIndex(out).source["id"]


@pytest.mark.parametrize("spec, revision, picked", [
    ("acme/tiny-moe-GGUF:Q8_0", None, "tiny-moe-Q8_0.gguf"),
    ("acme/tiny-moe-GGUF:q5_k_m", None, "tiny-moe-Q5_K_M.gguf"),
    ("acme/tiny-moe-GGUF", None, "tiny-moe-Q4_K_M.gguf"),  # llama-cli's default tag
    ("acme/tiny-moe-GGUF", "v2", "tiny-moe-Q6_K.gguf"),  # no Q4_K_M/Q8_0 there: the first model file
    ("acme/tiny-moe-GGUF:Q6_K", REV2, "tiny-moe-Q6_K.gguf"),  # a commit hash
])
def test_repo_of_ggufs_picks_the_file(hub, tmp_path, spec, revision, picked, downloads):
    out = tmp_path / "b"
    args = ["convert", spec, "-o", str(out), "-q", "--tiers", "Q4_K"] + (["--revision", revision] if revision else [])
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    idx = BundleIndex(out)
    assert idx.source["kind"] == "hf-repo" and idx.source["id"].endswith(f"({picked})")
    mix = picked.removeprefix("tiny-moe-").removesuffix(".gguf")
    qsrc, data = source_experts(downloads[mix])["blk.1.ffn_up_exps.weight"]
    s = idx.slice(1, "up", 0, Tier.Q4_K)
    if qsrc == QT.Q4_K:
        assert np.array_equal(read(s), data[0].reshape(-1))


@pytest.mark.parametrize("args, needle", [
    (["acme/tiny-moe-GGUF:IQ4_XS"], "has no GGUF for 'IQ4_XS'; it has Q4_K_M, Q5_K_M, Q8_0"),
    (["acme/tiny-moe-GGUF", "--revision", "nope"], "offline"),
    (["acme/not-cached:Q4_K_M"], "offline"),
    (["acme/tiny-moe-GGUF:Q4_K_M:x"], "does not exist: expected a model directory, a .gguf file or a Hugging"),
])
def test_repo_of_ggufs_errors(hub, tmp_path, args, needle):
    res = CliRunner().invoke(cli, ["convert", *args, "-o", str(tmp_path / "b"), "-q"])
    one_line_error(res, needle)


def test_revision_needs_a_repo_id(tmp_path, downloads):
    res = CliRunner().invoke(cli, ["convert", str(downloads["Q8_0"]), "-o", str(tmp_path / "b"), "--revision", "v2"])
    one_line_error(res, "--revision applies to Hugging Face repo ids")


def test_split_gguf_in_a_repo(hub, tmp_path, f32_gguf):
    d = tmp_path / "parts"
    d.mkdir()
    quantize_gguf(f32_gguf, d / "tiny-moe-Q8_0.gguf", "Q8_0", split_tensors=12)
    fake_hub_cache(hub, "acme/split-GGUF", {p.name: p for p in d.glob("*.gguf")}, rev=REV1)
    res = CliRunner().invoke(cli, ["convert", "acme/split-GGUF:Q8_0", "-o", str(tmp_path / "b"), "-q", "--tiers",
                                   "Q8_0"])
    assert res.exit_code == 0, res.output
    assert source_type(tmp_path / "b").endswith("(tiny-moe-Q8_0-00001-of-00003.gguf)")


def test_chat_template_travels_from_jinja_file_through_a_gguf(tmp_path, hf_model):
    """chat_template.jinja (transformers' own file) -> bundle -> a GGUF made from it -> a bundle of that GGUF."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_model("qwen3moe"), src)
    template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}<|assistant|>\n"
    (src / "chat_template.jinja").write_text(template)
    convert(src, tmp_path / "a", base_tier=Tier.F32, tiers=(Tier.Q8_0,), threads=2)
    g = quantize_gguf(tmp_path / "a" / "model.gguf", tmp_path / "m-Q8_0.gguf", "Q8_0")
    convert(g, tmp_path / "b", base_tier=Tier.Q8_0, tiers=(Tier.Q4_K,), threads=2)
    for b in ("a", "b"):
        field = gguf.GGUFReader(tmp_path / b / "model.gguf").get_field("tokenizer.chat_template")
        assert field is not None and field.contents() == template
        assert BundleIndex(tmp_path / b).hparams["chat_template"] is True


def test_repo_id_offline_in_a_fresh_process(tmp_path):
    """As a user runs it: a new interpreter (no test has imported huggingface_hub.constants before)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"))
    for spec in ("acme/none", "acme/none:Q4_K_M"):
        res = subprocess.run([sys.executable, "-m", "dymoe_gguf", "convert", spec, "-o", str(tmp_path / "b")],
                             capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "offline" in res.stderr
