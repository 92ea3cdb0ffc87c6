"""Every README command that writes files (convert, synth) runs end to end on the shipped model, and what it
wrote is inspected, verified and run: a README command that produces a bundle that cannot run fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dymoe_gguf.bundle import Tier
from dymoe_gguf.cli import cli
from tests.convert._gguf import fake_hub_cache, quantize_gguf
from tests.readme import bash_lines, variants

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-moe"
COMMANDS = ("convert", "inspect", "synth", "run")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                                                   reason="models/tiny-moe is not in this checkout")]


def readme_commands() -> list[list[str]]:
    """The README's ``dymoe-gguf convert|inspect|synth|run`` lines, as argument lists; ``[--opt]`` optional
    parts give one variant without any and one with all."""
    return [v[1:] for words in bash_lines() if len(words) >= 2 and words[0] == "dymoe-gguf"
            and words[1] in COMMANDS for v in variants(words)]


def test_readme_lists_the_commands_this_test_runs():
    cmds = readme_commands()
    assert {c[0] for c in cmds} == set(COMMANDS)
    assert any("--verify" in c for c in cmds) and any(":Q4_K_M" in " ".join(c) for c in cmds)


@pytest.fixture
def world(tmp_path, monkeypatch, tmp_path_factory) -> Path:
    """A working directory holding what the README's examples name: the model directory, a Q4_K_M GGUF,
    a prompt file and an offline Hugging Face cache with the repo ids."""
    from dymoe_gguf.convert import convert

    f32 = tmp_path_factory.mktemp("readme-f32") / "b"
    convert(MODEL, f32, base_tier=Tier.F32, tiers=(Tier.Q8_0,), threads=2)
    q4km = quantize_gguf(f32 / "model.gguf", tmp_path / "model-Q4_K_M.gguf", "Q4_K_M")
    cache = tmp_path_factory.mktemp("hub")
    fake_hub_cache(cache, "Qwen/Qwen3-30B-A3B", {p.name: p for p in MODEL.iterdir() if p.is_file()})
    fake_hub_cache(cache, "unsloth/Qwen3-30B-A3B-GGUF", {"Qwen3-30B-A3B-Q4_K_M.gguf": q4km,
                                                          "Qwen3-30B-A3B-Q8_0.gguf": q4km})
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    (tmp_path / "prompt.txt").write_text("Once upon a time, a small robot", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(args: list[str]):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, (args, res.output)
    return res


def test_readme_examples_end_to_end(world):
    local = {"path/to/hf-model": str(MODEL), "model/": str(MODEL), "models/tiny-moe": str(MODEL)}
    for args in readme_commands():
        invoke([local.get(a, a) for a in args])
    assert not (world / "m.dymoe").exists()  # --dry-run wrote nothing
    bundles = sorted(p.parent for p in world.glob("*/model.gguf"))
    assert [b.name for b in bundles] == ["m4.dymoe", "model.dymoe", "q3.dymoe", "q3k.dymoe", "t.dymoe", "tiny.dymoe"]
    # what synth wrote converts too
    invoke(["convert", "out/", "-o", "synth.dymoe", "-q"])
    for b in [*bundles, world / "synth.dymoe"]:
        assert "every checksum matches" in invoke(["inspect", str(b), "--verify"]).output
        # in a process of its own: a bundle llama.cpp cannot run aborts the process (it did: binary_op)
        res = subprocess.run([sys.executable, "-m", "dymoe_gguf", "run", str(b), "-p", "The history of", "-n", "8"],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert res.returncode == 0 and "The history of" in res.stdout, (b, res.returncode, res.stderr[-2000:])
    assert shutil.disk_usage(world).free > 0
