"""``dymoe-gguf bench --read-bps``: a storage read throttle (blkio / io.max cgroup) around each worker.

Real cgroups and real worker subprocesses; the throttled tests skip where no throttle can be set
(not root, no blkio/io controller, the temporary directory not on a block device).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dymoe_gguf.bench import cgroup, report
from dymoe_gguf.bench.models import BenchModel
from dymoe_gguf.bench.run import BenchOptions, add_ratios, headline, prepare_throttle, run_bench, run_worker
from dymoe_gguf.bundle.format import Tier
from dymoe_gguf.errors import DymoeError

from .test_bench import RECORDED, TINY, _cfg, _has_patch

MiB = 1 << 20
SLOW = 4_000_000  # bytes/s: the tiny model (~3 MB) takes most of a second to read at this rate


@pytest.fixture(scope="module")
def tiny(bundle) -> Path:
    return bundle("olmoe", base_tier=Tier.Q4_K, **TINY)


def _throttle_or_skip(path: Path) -> list[cgroup.BlockDevice]:
    """The disk holding ``path``, or skip where a throttle cannot be created on it."""
    try:
        dev = cgroup.block_device(path)
        cgroup.ReadThrottle.create(SLOW, [dev]).close()
    except cgroup.ThrottleUnavailable as exc:
        pytest.skip(f"no read throttle here: {exc}")
    return [dev]


def _leftovers() -> list[Path]:
    """Throttle cgroups this process created and did not remove."""
    try:
        m = cgroup.find_io_mount()
    except cgroup.ThrottleUnavailable:
        return []
    return sorted(m.path.glob(f"dymoe-bench-read-{os.getpid()}-*"))


# ---------------------------------------------------------------------------- parsing and the command line
def test_parse_rate_uses_the_size_units():
    assert cgroup.parse_rate("90MB") == 90_000_000
    assert cgroup.parse_rate("90MB/s") == 90_000_000
    assert cgroup.parse_rate("800 MiB") == 800 * MiB
    assert cgroup.parse_rate("1.5GB") == 1_500_000_000
    assert cgroup.parse_rate(5_000_000) == 5_000_000
    for bad in ("fast", "0", "-5MB", "90", "12 parsecs", ""):
        with pytest.raises(DymoeError):
            cgroup.parse_rate(bad)
    assert cgroup.fmt_rate(90e6) == "90 MB/s" and cgroup.fmt_rate(1.5e9) == "1.5 GB/s"


@pytest.mark.parametrize("rate", ["fast", "90", "0MB"])
def test_cli_bad_rate_is_one_line_and_fails_fast(tmp_path, rate):
    env = dict(os.environ, DYMOE_BENCH_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "dymoe_gguf", "bench", "--quick", "--read-bps", rate, "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "rate" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "cache").exists()  # no model was generated


def test_cli_help_lists_read_bps():
    p = subprocess.run([sys.executable, "-m", "dymoe_gguf", "bench", "-h"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--read-bps RATE" in p.stdout


# ---------------------------------------------------------------------------- the device and the cgroup
def test_block_device_is_a_whole_disk(tmp_path):
    try:
        d = cgroup.block_device(tmp_path)
    except cgroup.ThrottleUnavailable as exc:
        pytest.skip(str(exc))
    sysdev = (Path("/sys/dev/block") / d.dev).resolve()
    assert sysdev.name == d.name and not (sysdev / "partition").exists() and (sysdev / "queue").is_dir()
    with pytest.raises(cgroup.ThrottleUnavailable, match="not on a block device"):
        cgroup.block_device("/proc/self/status")


def test_v2_files_are_read(tmp_path):
    """cgroup v2's io.max / io.stat formats (this machine may have only v1 to run the rest on)."""
    (tmp_path / "io.max").write_text("254:0 rbps=90000000 wbps=max riops=max wiops=max\n"
                                     "8:0 rbps=max wbps=max riops=max wiops=max\n")
    (tmp_path / "io.stat").write_text("254:0 rbytes=1234 wbytes=5 rios=1 wios=1 dbytes=0 dios=0\n"
                                      "8:0 rbytes=99 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    t = cgroup.ReadThrottle(cgroup.CgroupMount(2, tmp_path.parent), tmp_path, 90_000_000,
                            [cgroup.BlockDevice(254, 0, "vda")], owns=False)
    assert t.limits() == {"254:0": 90_000_000, "8:0": None} and t.read_bytes() == 1234
    assert t.describe() == "storage reads throttled to 90 MB/s (io.max) on vda"


def test_throttle_is_set_joined_and_removed(tmp_path):
    devs = _throttle_or_skip(tmp_path)
    thr = cgroup.ReadThrottle.create(SLOW, devs)
    try:
        assert thr.path.is_dir() and thr.limits()[devs[0].dev] == SLOW
        assert thr.describe() == f"storage reads throttled to 4 MB/s ({thr.mechanism}) on {devs[0].name}"
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"], preexec_fn=thr.join_self)
        time.sleep(0.1)
        assert str(proc.pid) in (thr.path / "cgroup.procs").read_text().split()
        proc.wait()
    finally:
        thr.close()
    assert not thr.path.exists()
    thr.close()  # again: harmless
    with pytest.raises(RuntimeError), cgroup.ReadThrottle.create(SLOW, devs) as t2:  # an error inside: removed
        raise RuntimeError("boom")
    assert not t2.path.exists() and not _leftovers()


def test_probe_measures_the_limit(tiny):
    f = tiny / "model.gguf"
    devs = _throttle_or_skip(f)
    info = prepare_throttle(SLOW, [f])
    assert info["throttled"], info
    p = info["probe"]
    assert p["bytes"] == min(f.stat().st_size, SLOW) and p["cgroup_bytes"] >= p["bytes"] // 2
    assert p["bps"] < 1.3 * SLOW  # throttled: well below this disk's speed
    assert info["devices"] == [{"device": devs[0].name, "dev": devs[0].dev}] and not _leftovers()


# ---------------------------------------------------------------------------- real worker runs
def test_worker_reads_are_throttled(tiny):
    devs = _throttle_or_skip(tiny / "model.gguf")
    free = run_worker(_cfg(tiny, name="free", tokens=4, threads=1), None, 120)
    slow = run_worker(_cfg(tiny, name="slow", tokens=4, threads=1), None, 120, read_bps=SLOW, read_devices=devs)
    assert free["ok"] and slow["ok"], (free, slow)
    assert free["throttled"] is False and free["read_bps"] is None and free["throttle_read_bytes"] is None
    assert slow["throttled"] is True and slow["read_bps"] == SLOW and "throttle_error" not in slow
    cold = slow["bytes_read_load"]
    assert cold >= 1 * MiB  # the model file came from storage (cold cache) ...
    assert slow["throttle_read_bytes"] >= cold  # ... through the throttled disk ...
    assert slow["load_s"] >= 0.6 * cold / SLOW  # ... at no more than the limit (one 100 ms slice may burst)
    assert free["load_s"] < slow["load_s"], (free["load_s"], slow["load_s"])  # the throttle is what took time
    assert not _leftovers()


def test_worker_goes_on_unthrottled_where_no_throttle_can_be_set(tiny, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm")
    d = Path(shutil.copytree(tiny, shm / f"dymoe-test-{os.getpid()}.dymoe"))
    try:
        r = run_worker(_cfg(d, name="tmpfs", tokens=4, threads=1), None, 120, read_bps=SLOW)  # tmpfs: no disk
    finally:
        shutil.rmtree(d)
    assert r["ok"], r
    assert r["throttled"] is False and r["read_bps"] is None and "not on a block device" in r["throttle_error"]
    assert not _leftovers()


def test_timed_out_throttled_worker_leaves_no_cgroup(tiny):
    devs = _throttle_or_skip(tiny / "model.gguf")
    r = run_worker(_cfg(tiny, name="slow", tokens=4, threads=1), None, 0.3, read_bps=1_000_000, read_devices=devs)
    assert r["timed_out"] is True and r["ok"] is False
    assert not _leftovers()


# ---------------------------------------------------------------------------- report
def _recorded(throttle: dict | None) -> dict:
    res = copy.deepcopy(RECORDED)
    res["read_bps"] = throttle and throttle["read_bps"]
    res["throttle"] = throttle
    for r in res["runs"]:
        r["throttled"] = bool(throttle and throttle["throttled"])
    add_ratios(res["runs"])
    res["headline"] = headline(res["runs"], 0.5, True, res["read_bps"], throttle and throttle["throttled"])
    res["projection"] = report.projection(res)
    return res


def test_report_states_the_throttle_in_its_first_lines(tmp_path):
    thr = {"read_bps": 90_000_000, "throttled": True, "reason": None, "mechanism": "blkio",
           "devices": [{"device": "vda", "dev": "254:0"}], "line": "storage reads throttled to 90 MB/s (blkio) on vda",
           "probe": {"bytes": 90_000_000, "seconds": 1.0, "bps": 90e6, "storage_bytes": 90_000_000,
                     "cgroup_bytes": 90_000_000}}
    res = _recorded(thr)
    md = report.render_markdown(res).splitlines()
    assert md[0].startswith("Capped:")
    assert md[1].startswith("Throttled: storage reads throttled to 90 MB/s (blkio) on vda (254:0)")
    assert "(unthrottled)" not in "\n".join(md)
    assert res["headline"]["read_bps"] == 90_000_000 and res["headline"]["throttled"] is True
    assert res["headline"]["tpot_ratio"] == pytest.approx(0.546 / 0.020)
    files = report.write_all(res, tmp_path)
    back = json.loads(files["json"].read_text())
    assert back["read_bps"] == 90_000_000 and back["throttle"]["mechanism"] == "blkio"


def test_report_says_unthrottled_when_the_throttle_failed():
    thr = {"read_bps": 90_000_000, "throttled": False, "reason": "no write access", "mechanism": None,
           "devices": [], "line": None, "probe": None}
    res = _recorded(thr)
    md = report.render_markdown(res)
    assert md.splitlines()[1].startswith("**UNTHROTTLED**") and "no write access" in md.splitlines()[1]
    assert "## Headline (unthrottled)" in md and "ok (unthrottled) |" in md
    h = res["headline"]
    assert h["read_bps"] == 90_000_000 and h["throttled"] is False and "throttle_note" in h


def test_report_without_read_bps_is_unchanged():
    res = _recorded(None)
    md = report.render_markdown(res)
    assert md.splitlines()[1] == "" and "hrottl" not in md
    assert res["headline"]["read_bps"] is None and res["headline"]["throttled"] is None


def test_run_bench_end_to_end_throttled(tmp_path):
    devs = _throttle_or_skip(tmp_path)
    names = ["stock-q4k", "dymoe-expert" if _has_patch() else "dymoe-layer"]
    res = run_bench(BenchOptions(out=tmp_path / "out", model=BenchModel(vocab=512, **TINY), cap="256MB",
                                 tokens=4, prompt_tokens=8, threads=1, configs=names, quality=False, read_bps="20MB",
                                 cache_root=tmp_path / "cache"), log=lambda s: None)
    assert res["read_bps"] == 20_000_000 and res["throttle"]["throttled"], res["throttle"]
    assert res["headline"]["read_bps"] == 20_000_000 and res["headline"]["throttled"] is True
    assert all(r["ok"] and r["throttled"] and r["throttle_read_bytes"] > 0 for r in res["runs"]), res["runs"]
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert md[1].startswith(f"Throttled: storage reads throttled to 20 MB/s ({res['throttle']['mechanism']}) on "
                            f"{devs[0].name}")
    assert json.loads((tmp_path / "out" / "result.json").read_text())["throttle"]["devices"][0]["dev"] == devs[0].dev
    assert not _leftovers()


def test_run_bench_goes_on_unthrottled_on_tmpfs(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm")
    cache = shm / f"dymoe-test-cache-{os.getpid()}"
    try:
        res = run_bench(BenchOptions(out=tmp_path / "out", model=BenchModel(vocab=512, **TINY), cap="256MB",
                                     tokens=4, prompt_tokens=8, threads=1, configs=["stock-q4k", "stock-q4k-tuned"],
                                     quality=False, read_bps="90MB", cache_root=cache), log=lambda s: None)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert res["throttle"]["throttled"] is False and "not on a block device" in res["throttle"]["reason"]
    assert res["headline"]["read_bps"] == 90_000_000 and res["headline"]["throttled"] is False
    assert all(r["ok"] and r["throttled"] is False for r in res["runs"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.splitlines()[1].startswith("**UNTHROTTLED** — storage reads could not be throttled to 90 MB/s")
    assert "ok (unthrottled) |" in md or "ok (uncapped) (unthrottled) |" in md
