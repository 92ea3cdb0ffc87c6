"""The C programs of tests/native/c/, built against the patched llama.cpp (x86-native) and run natively.

scripts/test_aarch64.sh runs the same programs on aarch64 builds under qemu and compares the logits
across builds; here they run on this machine's own build:

* views_test: patch 0001 against ggml alone (one MoE layer mixing Q2_K/Q4_K/Q8_0 through per-expert
  views is bit-identical to the whole-layer path; prompt and decode batches; 1, 2 and 3 threads);
* forward: the shipped model's bundle through libllama, plain and with per-expert views into its sidecars,
  and with patch 0003's C hot path hooked on every MoE layer (``--hook``).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.native import fwd_compare
from tests.native.builds import FORWARD, VIEWS_TEST, cached_build

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-moe"
HELDOUT = ROOT / "data" / "heldout.txt"

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="runs the x86-native build")


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return cached_build("x86-native", drivers=(VIEWS_TEST, FORWARD))


def test_views_c_program(bin_dir):
    p = subprocess.run([str(bin_dir / "views_test"), "1", "2", "3"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "views_test: OK" in p.stdout


@pytest.fixture(scope="module")
def shipped_bundle(tmp_path_factory) -> Path:
    from dymoe_gguf.bundle.format import DEFAULT_BASE_TIER, DEFAULT_TIERS
    from dymoe_gguf.convert import convert

    if not (MODEL / "config.json").is_file():
        pytest.skip("models/tiny-moe is not in this checkout")
    out = tmp_path_factory.mktemp("shipped") / "tiny.dymoe"
    convert(MODEL, out, base_tier=DEFAULT_BASE_TIER, tiers=DEFAULT_TIERS, threads=2)  # convert's defaults
    return out


def _forward(bin_dir: Path, bundle: Path, out: Path, threads: int, *views: str,
             hook: bool = False) -> fwd_compare.Forward:
    cmd = [str(bin_dir / "forward"), *(["--hook"] if hook else []), str(bundle / "model.gguf"), str(HELDOUT), "64",
           str(threads), str(out)]
    if views:
        cmd += [str(bundle), *views[1:]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert ("forward: hook: " in p.stdout) == hook, p.stdout
    return fwd_compare.load(out)


def test_forward_with_views_on_the_shipped_bundle(bin_dir, shipped_bundle, tmp_path):
    plain1 = _forward(bin_dir, shipped_bundle, tmp_path / "plain1.bin", 1)
    plain2 = _forward(bin_dir, shipped_bundle, tmp_path / "plain2.bin", 2)
    q4k = _forward(bin_dir, shipped_bundle, tmp_path / "q4k.bin", 2, "views", "Q4_K")
    mixed = _forward(bin_dir, shipped_bundle, tmp_path / "mixed.bin", 2, "views")
    assert plain1.n_views == 0 and q4k.n_views == mixed.n_views == 4 * 3 * 8  # layers x matrices x experts
    assert plain1.page_size > 0 and plain1.tokens[0] == 1  # BOS first, as llama-perplexity tokenizes
    assert np.array_equal(plain1.logits.view(np.uint32), plain2.logits.view(np.uint32)), "threads changed bits"
    # every expert viewed at the base's own tier (the same bytes, from the sidecar): the base's bits
    assert np.array_equal(q4k.logits.view(np.uint32), plain2.logits.view(np.uint32))
    # mixed tiers: a different model, close to the base one
    d = fwd_compare.compare(plain2, mixed)
    assert d.max_abs > 0 and d.top1_agree > 0.7, d


def test_forward_with_the_c_hot_path(bin_dir, shipped_bundle, tmp_path):
    # forward --hook checks the hook's log, misses and counters against each other (exit 3 otherwise);
    # the hook reads and publishes but changes no computed value: the bits of the same run without it
    mixed = _forward(bin_dir, shipped_bundle, tmp_path / "mixed.bin", 2, "views")
    hooked = _forward(bin_dir, shipped_bundle, tmp_path / "hooked.bin", 2, "views", hook=True)
    assert hooked.n_views == mixed.n_views > 0
    assert np.array_equal(hooked.logits.view(np.uint32), mixed.logits.view(np.uint32))
