"""Hugging Face repo ids: served from an existing huggingface-hub cache offline; a clear error otherwise."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.cli import cli


def _fake_cache(root, src, repo="acme/tiny-moe", rev="0123456789abcdef0123456789abcdef01234567"):
    """The on-disk layout huggingface-hub uses: models--owner--name/{refs/main, snapshots/REV/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    shutil.copytree(src, base / "snapshots" / rev)
    return repo


def test_repo_id_from_offline_cache(tmp_path, hf_model, monkeypatch):
    cache = tmp_path / "hub"
    repo = _fake_cache(cache, hf_model("olmoe"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["convert", repo, "-o", str(out), "-q", "--tiers", "Q8_0"])
    assert res.exit_code == 0, res.output
    idx = BundleIndex(out)
    assert idx.source["kind"] == "hf-repo" and idx.source["id"] == repo


def test_repo_id_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["convert", "acme/not-cached", "-o", str(out), "-q"])
    assert res.exit_code == 1 and "offline" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()
