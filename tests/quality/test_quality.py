"""eval and calibrate on tiny fixture models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.bundle.format import CALIBRATION_FILE
from dymoe_gguf.cli import cli
from dymoe_gguf.quality.eval import evaluate
from dymoe_gguf.quality.profile import load_profile

# Public domain (Jane Austen, Pride and Prejudice, 1813), repeated to give several chunks.
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife. However little known the feelings or views of such a man may be on his first "
        "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
        "he is considered the rightful property of some one or other of their daughters. ") * 8


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "heldout.txt"
    p.write_text(TEXT)
    return p


def test_kl_grows_and_top1_falls_as_tiers_shrink(bundle, text_file):
    ref = bundle("qwen3moe", base_tier=Tier.F32)
    q = bundle("qwen3moe", base_tier=Tier.Q8_0)
    res = {t: evaluate(q, text_file, reference=ref, ctx=64, max_chunks=6, policy=f"uniform:{t}", lookahead=0)
           for t in ("Q8_0", "Q4_K", "Q2_K")}
    assert res["Q8_0"].kl_mean < res["Q4_K"].kl_mean < res["Q2_K"].kl_mean
    assert res["Q8_0"].top1 >= res["Q4_K"].top1 >= res["Q2_K"].top1
    assert res["Q8_0"].top1 > 0.9 and res["Q2_K"].kl_mean > 0
    assert all(r.tokens == 6 * 31 for r in res.values())  # second half of each chunk, llama-perplexity style
    self_ref = evaluate(ref, text_file, ctx=64, max_chunks=2)  # the full-precision bundle is its own reference
    # against itself only the 16-bit storage of the reference's log-probabilities remains (llama-perplexity's):
    # its rounding can make the mean slightly negative, and a tie may flip a top-1 (2 of 20,320 positions on
    # the shipped model's held-out text)
    assert abs(self_ref.kl_mean) < 1e-5 and self_ref.top1 >= 0.99 and np.isfinite(self_ref.ppl)
    assert self_ref.kl_mean < res["Q8_0"].kl_mean / 10


def test_eval_cli_json(bundle, text_file):
    ref = bundle("qwen3moe", base_tier=Tier.F32)
    q = bundle("qwen3moe", base_tier=Tier.Q8_0)
    r = CliRunner().invoke(cli, ["eval", str(q), "--text", str(text_file), "--reference", str(ref), "--ctx", "64",
                                 "--chunks", "2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {"ppl", "kl_mean", "top1", "tokens"} <= set(d) and d["policy"] == "off"
    r = CliRunner().invoke(cli, ["eval", str(q), "--text", str(text_file) + ".missing"])
    assert r.exit_code == 1 and "does not exist" in r.output


def _clean_failure(r, needle: str) -> None:
    text = r.output.strip()
    assert r.exit_code == 1 and r.exc_info[0] is SystemExit, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("Error: ") and needle.lower() in text.lower(), text


def test_eval_bad_reference_is_one_line(bundle, text_file, tmp_path):
    """A reference that is not a GGUF (a text file, a sidecar-less directory, garbage after the magic)."""
    q = bundle("qwen3moe", base_tier=Tier.Q8_0)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\xff" * 64)
    args = ["eval", str(q), "--text", str(text_file), "--ctx", "64", "--chunks", "1", "--reference"]
    _clean_failure(CliRunner().invoke(cli, args + [str(notes)]), "is not a GGUF file")
    _clean_failure(CliRunner().invoke(cli, args + [str(fake)]), "cannot load the reference")
    _clean_failure(CliRunner().invoke(cli, args + [str(tmp_path / "missing.gguf")]), "does not exist")
    _clean_failure(CliRunner().invoke(cli, ["eval", str(q), "--text", str(tmp_path)]), "is not a file")


def _hot_experts(src) -> list[int]:
    """The expert the planted skew favours in each layer: the router row with the largest norm."""
    from safetensors.numpy import load_file

    w = load_file(str(src / "model.safetensors"))
    layers = sorted({int(k.split(".")[2]) for k in w if ".mlp.gate.weight" in k})
    return [int(np.linalg.norm(w[f"model.layers.{i}.mlp.gate.weight"].astype(np.float32), axis=1).argmax())
            for i in layers]


def test_calibrate_reflects_planted_skew_and_is_stable(tmp_path, hf_model, text_file):
    from dymoe_gguf.convert import convert

    src = hf_model("qwen3moe", n_layer=3, skew=3.0, seed=5)
    out = tmp_path / "b"
    convert(src, out, base_tier=Tier.Q8_0, tiers=(Tier.Q2_K, Tier.Q8_0), threads=2)
    r = CliRunner().invoke(cli, ["calibrate", str(out), "--text", str(text_file), "--ctx", "64", "--chunks", "4",
                                 "--imatrix", str(tmp_path / "imatrix.gguf"), "--json"])
    assert r.exit_code == 0, r.output
    first = load_profile(BundleIndex(out))
    assert first.tokens == 4 * 64
    np.testing.assert_allclose(first.freq.sum(1), 2.0, rtol=1e-6)  # k selections per token
    assert list(first.freq.argmax(1)) == _hot_experts(src)
    assert max(json.loads(r.output)["normalized_entropy"]) < 0.9
    (out / CALIBRATION_FILE).unlink()  # the second run must write a profile of its own, not leave the first
    r = CliRunner().invoke(cli, ["calibrate", str(out), "--text", str(text_file), "--ctx", "64", "--chunks", "4"])
    assert r.exit_code == 0, r.output
    again = load_profile(BundleIndex(out))
    assert again is not None
    assert np.array_equal(first.freq, again.freq) and np.array_equal(first.mass, again.mass)
    # the imatrix is accepted by convert
    convert(src, tmp_path / "b2", base_tier=Tier.Q8_0, tiers=(Tier.Q2_K,), threads=2,
            imatrix=tmp_path / "imatrix.gguf")


def test_uniform_routing_has_high_entropy(tmp_path, hf_model, text_file):
    from dymoe_gguf.convert import convert
    from dymoe_gguf.quality.calibrate import calibrate

    src = hf_model("qwen3moe", n_layer=2, skew=0.0, seed=7)
    out = tmp_path / "b"
    convert(src, out, base_tier=Tier.Q8_0, tiers=(Tier.Q2_K,), threads=2)
    res = calibrate(out, text_file, ctx=64, max_chunks=4)
    assert min(res.entropy) > 0.8
