"""``dymoe-gguf bench -m BUNDLE``: llama-bench for the user's own bundle, on the shipped trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dymoe_gguf.cli import cli

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-moe"

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="models/tiny-moe is not in this checkout")


@pytest.fixture(scope="module")
def shipped(shipped_bundle) -> Path:
    """models/tiny-moe converted with convert's default options (the session's shared bundle)."""
    return shipped_bundle


def test_bench_m_table_with_stock(shipped):
    """The README's command (small -p/-n/-r): llama-bench's table, dymoe and stock in the same run."""
    res = CliRunner().invoke(cli, ["bench", "-m", str(shipped), "-p", "32", "-n", "16", "-r", "2", "--compare-stock"])
    assert res.exit_code == 0, res.output
    rows = [x for x in res.stdout.splitlines() if x.startswith(f"| {shipped.name}")]
    assert len(rows) == 4, res.stdout  # (dymoe, stock) x (pp32, tg16)
    tests = [(r.split("|")[3].strip(), r.split("|")[6].strip()) for r in rows]
    assert [t for _, t in tests] == ["pp32", "tg16", "pp32", "tg16"]
    assert tests[0][0].startswith("dymoe") and tests[2][0] == "stock llama.cpp (repack off)"
    for r in rows:
        avg, pm, sd = r.split("|")[7].split()
        assert float(avg) > 0 and pm == "±" and float(sd) >= 0


def test_bench_m_json_under_a_budget(shipped):
    res = CliRunner().invoke(cli, ["bench", "-m", str(shipped), "--budget", "4MiB", "-p", "16", "-n", "8", "-r", "3",
                                   "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["budget_bytes"] == 4 << 20 and data["reps"] == 3
    assert [r["test"] for r in data["results"]] == ["pp16", "tg8"]  # no stock without --compare-stock
    for r in data["results"]:
        assert r["ok"] and len(r["ts"]) == 3 and r["avg_ts"] == pytest.approx(sum(r["ts"]) / 3)
        assert r["stddev_ts"] >= 0
    c = data["controller"]
    assert c["mode"] in ("per-expert", "per-layer") and c["max_resident_expert_bytes"] > 0


def test_bench_m_bad_input_is_one_line(tmp_path, shipped):
    runner = CliRunner()
    res = runner.invoke(cli, ["bench", "-m", str(tmp_path / "missing.dymoe")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("Error:")
    res = runner.invoke(cli, ["bench", "-m", str(shipped), "--quick"])  # a synthetic-bench option
    assert res.exit_code == 2 and "--quick is an option of the synthetic benchmark" in res.output
    res = runner.invoke(cli, ["bench", "--compare-stock"])  # an -m option without -m
    assert res.exit_code == 2 and "--compare-stock needs -m BUNDLE" in res.output
