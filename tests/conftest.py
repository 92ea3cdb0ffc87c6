"""Shared fixtures: tiny MoE checkpoints of each architecture, converted once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dymoe_gguf.bundle.format import DEFAULT_TIERS, Tier
from dymoe_gguf.synth import SynthConfig, write_checkpoint

ARCHS = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")


@pytest.fixture(scope="session", autouse=True)
def _index_cache(tmp_path_factory):
    """Bundle indexes are cached in a session directory, not in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYMOE_INDEX_CACHE", str(tmp_path_factory.mktemp("index-cache")))
        yield


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> Callable[..., Path]:
    """``hf_model(arch="qwen3moe", **synth)`` -> a checkpoint directory (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "qwen3moe", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf-{arch}")
            cache[key] = write_checkpoint(out, SynthConfig(arch=arch, **kw))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, hf_model) -> Callable[..., Path]:
    """``bundle(arch, base_tier=Tier.F32, tiers=DEFAULT_TIERS, **synth)`` -> converted bundle (cached)."""
    from dymoe_gguf.convert import convert

    cache: dict[tuple, Path] = {}

    def make(arch: str = "qwen3moe", base_tier: Tier = Tier.F32, tiers: tuple[Tier, ...] = DEFAULT_TIERS,
             **kw) -> Path:
        key = (arch, base_tier, tiers, tuple(sorted(kw.items())))
        if key not in cache:
            src = hf_model(arch, **kw)
            out = tmp_path_factory.mktemp(f"bundle-{arch}") / "model.dymoe"
            convert(src, out, base_tier=base_tier, tiers=tiers, threads=2)
            cache[key] = out
        return cache[key]

    return make


SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-moe"


@pytest.fixture(scope="session")
def shipped_bundle(tmp_path_factory) -> Path:
    """The shipped model (models/tiny-moe) converted with ``convert``'s default options, as the README does."""
    from click.testing import CliRunner

    from dymoe_gguf.cli import cli

    if not (SHIPPED_MODEL / "config.json").is_file():
        pytest.skip("models/tiny-moe is not in this checkout")
    out = tmp_path_factory.mktemp("shipped") / "tiny.dymoe"
    res = CliRunner().invoke(cli, ["convert", str(SHIPPED_MODEL), "-o", str(out), "-q", "-t", "2"])
    assert res.exit_code == 0, res.output
    return out
