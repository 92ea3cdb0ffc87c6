"""Bad input: a one-line error, a non-zero exit, no traceback, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dymoe_gguf.bundle import Tier
from dymoe_gguf.cli import cli


def run_convert(src: Path | str, out: Path, *extra: str):
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "-q", *extra])
    return res


def assert_clean_failure(res, out: Path, needle: str) -> None:
    text = res.output.strip()
    assert res.exit_code != 0, text
    assert "Traceback" not in text and res.exc_info[0] is SystemExit, text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("Error: ") and needle.lower() in text.lower(), text
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.fixture
def src(tmp_path, hf_model) -> Path:
    """A private copy of a good tiny checkpoint, for each test to break."""
    dst = tmp_path / "src"
    shutil.copytree(hf_model("qwen3moe"), dst)
    return dst


def edit_config(src: Path, **changes) -> None:
    """Rewrite the fixture's config.json: a value of None removes the key."""
    cfg = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))


def test_missing_source(tmp_path):
    assert_clean_failure(run_convert(tmp_path / "nope", tmp_path / "out"), tmp_path / "out", "does not exist")


def test_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run_convert(tmp_path / "empty", tmp_path / "out"), tmp_path / "out", "empty")


def test_no_weights(src, tmp_path):
    (src / "model.safetensors").unlink()
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "No weights")


def test_dense_model(src, tmp_path):
    edit_config(src, num_experts=None)
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "dense")


def test_unsupported_architecture(src, tmp_path):
    edit_config(src, architectures=["DeepseekV3ForCausalLM"])
    res = run_convert(src, tmp_path / "out")
    assert_clean_failure(res, tmp_path / "out", "Unsupported architecture")
    for name in ("mixtral", "olmoe", "qwen2moe", "qwen3moe"):
        assert name in res.output


def test_truncated_safetensors(src, tmp_path):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "truncated")


def test_corrupt_safetensors(src, tmp_path):
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "Corrupt")


def test_invalid_config(src, tmp_path):
    (src / "config.json").write_text("{not json")
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "Invalid config.json")


def test_config_missing_required_key(src, tmp_path):
    edit_config(src, hidden_size=None)
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "hidden_size")


def test_missing_tokenizer(src, tmp_path):
    (src / "tokenizer.json").unlink()
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "tokenizer")


def test_missing_shard(tmp_path, hf_model):
    src = tmp_path / "src"
    shutil.copytree(hf_model("mixtral", shards=2), src)
    (src / "model-00002-of-00002.safetensors").unlink()
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "model-00002-of-00002")


def test_expert_count_disagrees(src, tmp_path):
    edit_config(src, num_experts=16)
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "disagree")


def test_truncated_gguf(tmp_path, bundle):
    g = tmp_path / "m.gguf"
    data = (bundle("qwen3moe", base_tier=Tier.Q8_0) / "model.gguf").read_bytes()
    g.write_bytes(data[:4000])
    assert_clean_failure(run_convert(g, tmp_path / "out"), tmp_path / "out", "GGUF")


def test_corrupt_gguf(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 200)
    assert_clean_failure(run_convert(g, tmp_path / "out"), tmp_path / "out", "GGUF")


def test_output_exists(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_convert(src, out)
    assert res.exit_code != 0 and "already exists" in res.output and "not a dymoe-gguf bundle" in res.output
    assert (out / "keep.txt").read_text() == "mine"


def test_not_enough_disk(src, tmp_path, monkeypatch):
    from collections import namedtuple

    import dymoe_gguf.convert.output as writer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "Not enough disk")


def test_bad_tier_names(src, tmp_path):
    assert_clean_failure(run_convert(src, tmp_path / "out", "--tiers", "Q2_K,Q9_Z"), tmp_path / "out", "Q9_Z")
    assert_clean_failure(run_convert(src, tmp_path / "out", "--base-tier", "Q1"), tmp_path / "out", "Q1")
    assert_clean_failure(run_convert(src, tmp_path / "out", "--tiers", "F16"), tmp_path / "out", "sidecar")


def test_force_replaces_and_dry_run_writes_nothing(src, tmp_path):
    out = tmp_path / "out"
    res = run_convert(src, out, "--dry-run")
    assert res.exit_code == 0 and "experts.Q2_K.gguf" in res.output and not out.exists()
    out.mkdir()
    res = run_convert(src, out, "--force", "--tiers", "Q8_0")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["experts.Q8_0.gguf", "model.gguf"]


def test_corrupt_tokenizer_json_beside_tokenizer_model(src, tmp_path):
    """SentencePiece is read from tokenizer.model; the broken tokenizer.json beside it (read for special tokens
    and the chat template) is named, not a JSONDecodeError traceback."""
    shutil.copy(Path(__file__).resolve().parents[2] / "models" / "tiny-moe" / "tokenizer.model", src)
    (src / "tokenizer.json").write_text("{bad json")
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "Invalid tokenizer.json")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").write_text("[1, 2]")
    assert_clean_failure(run_convert(src, tmp_path / "out"), tmp_path / "out", "Invalid tokenizer_config.json")


def test_nonsense_option_values(src, tmp_path):
    out = tmp_path / "out"
    for args, needle in ((["--threads", "0"], "--threads"), (["--threads", "x"], "--threads"),
                         (["--tiers", ""], "at least one tier"), (["--tiers", "Q2_K,Q2_K"], "distinct"),
                         (["--base-tier", ""], "Expected a tier"),
                         (["--tensor-type", "attn_q=Q4_K_M"], "not a ggml type"),
                         (["--imatrix", ""], "Importance matrix")):
        res = run_convert(src, out, *args)
        text = res.output.strip()
        assert res.exit_code != 0 and "Traceback" not in text and needle in text, (args, text)
        assert not out.exists() and not list(tmp_path.glob(".out.*"))
