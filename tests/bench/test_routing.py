"""The synthetic model's routing knobs (synth.py) and the routing statistics the bench reports (routing.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dymoe_gguf.bench.models import BenchModel
from dymoe_gguf.bench.routing import excess_entropy, routing_stats
from dymoe_gguf.bundle.format import Tier
from dymoe_gguf.synth import RANDOM, REALISTIC, SynthConfig, make_weights

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"arch": "olmoe", "n_layer": 2, "d": 256, "ff": 256, "n_expert": 8, "top_k": 2, "n_head": 4, "vocab": 512}


def _digest(w: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode())
        h.update(np.ascontiguousarray(w[k]).tobytes())
    return h.hexdigest()


def test_default_knobs_keep_the_original_model_bit_for_bit():
    """The tests' models and the bench's random model are the ones generated before the knobs existed
    (digest recorded from that generator)."""
    w = make_weights(SynthConfig(**SMALL))
    assert _digest(w) == "ac1e7c136de8a871eaceb0cab38d370e7a9fc635f577f4828cc3d6670cec56d3"
    assert _digest(make_weights(SynthConfig(**SMALL, **RANDOM))) == _digest(w)


def test_residual_scale_scales_what_layers_add():
    base = make_weights(SynthConfig(**SMALL))
    half = make_weights(SynthConfig(**SMALL, residual_scale=0.5))
    for k, v in base.items():
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            assert np.array_equal(half[k], (v * np.float32(0.5)).astype(np.float32)), k
        else:  # nothing else changes, the random stream included
            assert np.array_equal(half[k], v), k


def _router(w: dict, layer: int) -> np.ndarray:
    return w[f"model.layers.{layer}.mlp.gate.weight"]


def test_router_correlation_and_logit_scale():
    c = dict(SMALL, n_layer=3, d=512, ff=32, n_expert=32, skew=0.0)
    for rho in (0.0, 0.8):
        w = make_weights(SynthConfig(**c, router_corr=rho))
        got = np.corrcoef(_router(w, 1).ravel(), _router(w, 2).ravel())[0, 1]
        assert got == pytest.approx(rho, abs=0.02), (rho, got)
    w = make_weights(SynthConfig(**c, router_logit_std=1.5))
    h = np.random.default_rng(1).standard_normal((500, 512)).astype(np.float32)  # RMS-normalised hidden states
    assert (h @ _router(w, 0).T).std() == pytest.approx(1.5, rel=0.05)
    with pytest.raises(ValueError):
        SynthConfig(**SMALL, router_corr=1.0)


def test_bench_models_differ_only_in_routing():
    real, rand = BenchModel(n_layer=2), BenchModel(n_layer=2, routing="random")
    assert real.synth().residual_scale == REALISTIC["residual_scale"] and rand.synth().skew == RANDOM["skew"]
    assert real.key() != rand.key()
    # the random model keeps the cache key it had before routings existed (a cached model is reused)
    assert rand.key() == "882a1e3d070aaa2e"  # BenchModel(n_layer=2).key() before routings
    with pytest.raises(ValueError):
        BenchModel(routing="trained")


def test_excess_entropy_is_comparable_across_expert_counts():
    assert excess_entropy(np.log(2) / np.log(8), 8, 2) == pytest.approx(0.0)  # the floor: always the same k
    assert excess_entropy(1.0, 64, 8) == pytest.approx(1.0)
    assert excess_entropy(0.60, 8, 2) == pytest.approx(0.40)
    assert excess_entropy(0.70, 64, 8) == pytest.approx(0.40)


@pytest.mark.slow
def test_realistic_knobs_make_lookahead_predictable(hf_model, tmp_path):
    """Through llama.cpp and the controller: small residual updates and a sane router scale (the realistic
    knobs) give a far higher next-layer look-ahead recall than the random model, as on the bench model."""
    from dymoe_gguf.convert import convert

    shape = dict(n_layer=3, d=512, ff=256, n_expert=64, top_k=8, n_head=4, vocab=512, seed=3)
    stats = {}
    for name, knobs in (("random", RANDOM), ("realistic", REALISTIC)):
        out = tmp_path / f"{name}.dymoe"
        convert(hf_model("olmoe", **shape, **knobs), out, base_tier=Tier.Q8_0, tiers=(Tier.Q8_0,), threads=2)
        stats[name] = routing_stats(out, ROOT / "data" / "heldout.txt", chunks=2)
        assert not (out / "calibration.gguf").exists()  # calibrated on a copy: the bundle stays as converted
    real, rand = stats["realistic"], stats["random"]
    assert len(real["normalized_entropy"]) == 3 and len(real["lookahead_recall_by_layer"]) == 3
    assert real["lookahead_recall"] > rand["lookahead_recall"] + 0.1, (real, rand)
    assert real["lookahead_recall"] > 0.8


def test_synth_cli_takes_the_routing_knobs(tmp_path):
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from dymoe_gguf.cli import cli

    args = ["--arch", "olmoe", "--layers", "2", "--d-model", "128", "--expert-ff", "64", "--experts", "4",
            "--dtype", "float32"]
    for name, extra in (("a", []), ("b", ["--residual-scale", "0.5", "--router-corr", "0.3"])):
        res = CliRunner().invoke(cli, ["synth", str(tmp_path / name), *args, *extra])
        assert res.exit_code == 0, res.output
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    k = "model.layers.1.mlp.experts.0.down_proj.weight"
    assert np.allclose(b[k], 0.5 * a[k])
    r = "model.layers.1.mlp.gate.weight"
    assert not np.array_equal(a[r], b[r]) and np.array_equal(a["model.layers.0.mlp.gate.weight"],
                                                             b["model.layers.0.mlp.gate.weight"])
    res = CliRunner().invoke(cli, ["synth", str(tmp_path / "c"), "--router-corr", "1"])
    assert res.exit_code == 2 and "--router-corr" in res.output
