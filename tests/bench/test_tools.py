"""The benchmarks' shared pieces: the one decode-timing loop, the scripts that use it, doctor's cgroup answer."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dymoe_gguf.bench import cgroup, timing
from dymoe_gguf.bundle.format import Tier

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("bench_*.py"))


def _script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratio_and_mean_std():
    assert timing.ratio(6.0, 2.0) == 3.0 and timing.ratio(None, 2.0) is None and timing.ratio(1.0, 0.0) is None
    assert timing.mean_std([2.0, 4.0]) == pytest.approx((3.0, 2 ** 0.5)) and timing.mean_std([5.0]) == (5.0, 0.0)


def test_decode_times_feed_and_greedy(bundle):
    """Each timed step evaluates exactly one token: the feed's, or the model's own argmax."""
    from dymoe_gguf._native.llama import last_logits, open_llama
    from dymoe_gguf.bundle import BundleIndex

    path = BundleIndex(bundle("olmoe", base_tier=Tier.Q8_0, n_layer=2, d=256, ff=256, n_expert=8, top_k=2,
                              n_head=4)).base_path
    llm = open_llama(path, n_ctx=128, n_threads=2)
    try:
        first = timing.eval_prompt(llm, [1, 2, 3])
        assert first == int(last_logits(llm).argmax()) and llm.n_tokens == 3
        fed = timing.decode_times(llm, [5, 6, 7, 8], first=first, warmup=2)
        assert len(fed) == 4 and all(t > 0 for t in fed)
        assert llm.n_tokens == 3 + 2 + 4 and list(llm.input_ids[5:9]) == [5, 6, 7, 8]
        calls = []
        timing.eval_prompt(llm, [1, 2, 3])
        greedy = timing.decode_times(llm, 3, on_step=lambda: calls.append(int(last_logits(llm).argmax())))
        assert len(greedy) == 3 and len(calls) == 3
        assert list(llm.input_ids[4:6]) == calls[:2]  # each step fed the previous step's argmax
    finally:
        llm.close()


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_scripts_take_the_options_they_document(path):
    """Every --option a script's usage lines (``scripts/NAME.py ...`` and their continuations) show is one its
    argument parser accepts."""
    usage, inside = [], False
    for line in (_script(path).__doc__ or "").splitlines():
        inside = f"scripts/{path.name}" in line or (inside and line.lstrip().startswith(("[", "--")))
        if inside:
            usage.append(line)
    shown = set(re.findall(r"(--[a-z][a-z-]+)", "\n".join(usage)))
    out = subprocess.run([sys.executable, str(path), "-h"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    accepted = set(re.findall(r"(--[a-z][a-z-]+)", out.stdout.split("options:")[-1]))
    assert shown <= accepted, f"{path.name} documents {sorted(shown - accepted)} but does not take them"


def test_timing_scripts_use_the_shared_loop():
    for name in ("bench_runtime", "bench_views"):
        assert _script(ROOT / "scripts" / f"{name}.py").decode_times is timing.decode_times


def test_doctor_answers_with_the_bench_cgroup_lookup(monkeypatch):
    """doctor's memory-cap line is the answer bench acts on, whatever that answer is."""
    from dymoe_gguf.cli import cli

    res = CliRunner().invoke(cli, ["doctor", "--json"])
    import json

    assert json.loads(res.output)["memory_cap"] == cgroup.cap_status()
    monkeypatch.setattr(cgroup, "why_unavailable", lambda: "no write access to /x (run as root)")
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert json.loads(res.output)["memory_cap"] == {"available": False, "how": "no write access to /x (run as root)"}
