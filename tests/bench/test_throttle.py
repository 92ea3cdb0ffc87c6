"""``dymoe-gguf bench --read-bps/--read-iops/--storage``: a storage read throttle (blkio / io.max cgroup)
around each worker.

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
from dymoe_gguf.bench import throttle as tt
from dymoe_gguf.bench.compare import add_ratios, headline
from dymoe_gguf.bench.configs import BenchOptions
from dymoe_gguf.bench.models import BenchModel
from dymoe_gguf.bench.run import read_limits, run_bench
from dymoe_gguf.bench.runner import prepare_throttle, run_worker
from dymoe_gguf.bundle.format import Tier
from dymoe_gguf.errors import DymoeError

from .test_bench import RECORDED, TINY, _cfg, _has_patch

MiB = 1 << 20
SLOW = 4_000_000  # bytes/s: the tiny model (~3 MB) takes most of a second to read at this rate


@pytest.fixture(scope="module")
def tiny(bundle) -> Path:
    return bundle("olmoe", base_tier=Tier.Q4_K, **TINY)


def _throttle_or_skip(path: Path) -> list[tt.BlockDevice]:
    """The disk holding ``path``, or skip where a throttle cannot be created on it."""
    try:
        dev = tt.block_device(path)
        tt.ReadThrottle.create([dev], bps=SLOW, iops=100).close()
    except tt.ThrottleUnavailable as exc:
        pytest.skip(f"no read throttle here: {exc}")
    return [dev]


def _leftovers() -> list[Path]:
    """Throttle cgroups this process created and did not remove."""
    try:
        m = tt.find_io_mount()
    except tt.ThrottleUnavailable:
        return []
    return sorted(m.path.glob(f"dymoe-bench-read-{os.getpid()}-*"))


# ---------------------------------------------------------------------------- parsing and the command line
def test_parse_rate_uses_the_size_units():
    assert tt.parse_rate("90MB") == 90_000_000
    assert tt.parse_rate("90MB/s") == 90_000_000
    assert tt.parse_rate("800 MiB") == 800 * MiB
    assert tt.parse_rate("1.5GB") == 1_500_000_000
    assert tt.parse_rate(5_000_000) == 5_000_000
    for bad in ("fast", "0", "-5MB", "90", "12 parsecs", ""):
        with pytest.raises(DymoeError):
            tt.parse_rate(bad)
    assert tt.fmt_rate(90e6) == "90 MB/s" and tt.fmt_rate(1.5e9) == "1.5 GB/s"


def test_parse_iops_and_storage_profiles():
    assert tt.parse_iops("2000") == tt.parse_iops("2k") == tt.parse_iops(2000) == 2000
    assert tt.parse_iops("50K") == 50_000 and tt.parse_iops("1.5k") == 1500
    for bad in ("fast", "0", "5", "-2k", "2.5", ""):
        with pytest.raises(DymoeError):
            tt.parse_iops(bad)
    assert tt.fmt_limits(90_000_000, 2000) == "90 MB/s, 2000 IOPS" and tt.fmt_limits(None, 2000) == "2000 IOPS"
    sd = tt.STORAGE["sd"]
    assert (sd.bps, sd.iops) == (90_000_000, 2_000) and tt.STORAGE["nvme"].bps == 800_000_000
    # a profile gives both limits, an explicit --read-bps / --read-iops overrides its part
    assert read_limits(BenchOptions(storage="sd")) == (90_000_000, 2000)
    assert read_limits(BenchOptions(storage="sd", read_iops="500")) == (90_000_000, 500)
    assert read_limits(BenchOptions(read_bps="20MB")) == (20_000_000, None)
    with pytest.raises(DymoeError, match="Unknown storage profile"):
        read_limits(BenchOptions(storage="floppy"))


@pytest.mark.parametrize("args", [["--read-bps", "fast"], ["--read-bps", "90"], ["--read-bps", "0MB"],
                                  ["--read-iops", "lots"], ["--read-iops", "3"]])
def test_cli_bad_limit_is_one_line_and_fails_fast(tmp_path, args):
    env = dict(os.environ, DYMOE_BENCH_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "dymoe_gguf", "bench", "--quick", *args, "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {args[0]}:"), p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "cache").exists()  # no model was generated


def test_cli_help_lists_the_throttle_options():
    p = subprocess.run([sys.executable, "-m", "dymoe_gguf", "bench", "-h"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--read-bps RATE" in p.stdout and "--read-iops IOPS" in p.stdout
    assert "--storage [nvme|sd]" in p.stdout


# ---------------------------------------------------------------------------- the device and the cgroup
def test_block_device_is_a_whole_disk(tmp_path):
    try:
        d = tt.block_device(tmp_path)
    except tt.ThrottleUnavailable as exc:
        pytest.skip(str(exc))
    sysdev = (Path("/sys/dev/block") / d.dev).resolve()
    assert sysdev.name == d.name and not (sysdev / "partition").exists() and (sysdev / "queue").is_dir()
    with pytest.raises(tt.ThrottleUnavailable, match="not on a block device"):
        tt.block_device("/proc/self/status")


def test_v2_files_are_read(tmp_path):
    """cgroup v2's io.max / io.stat formats (this machine may have only v1 to run the rest on)."""
    (tmp_path / "io.max").write_text("254:0 rbps=90000000 wbps=max riops=2000 wiops=max\n"
                                     "8:0 rbps=max wbps=max riops=max wiops=max\n")
    (tmp_path / "io.stat").write_text("254:0 rbytes=1234 wbytes=5 rios=7 wios=1 dbytes=0 dios=0\n"
                                      "8:0 rbytes=99 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    t = tt.ReadThrottle(cgroup.CgroupMount(2, tmp_path.parent), tmp_path, [tt.BlockDevice(254, 0, "vda")],
                        owns=False, bps=90_000_000, iops=2000)
    assert t.limits() == {"254:0": (90_000_000, 2000), "8:0": (None, None)}
    assert t.read_bytes() == 1234 and t.read_ios() == 7
    assert t.describe() == "storage reads throttled to 90 MB/s, 2000 IOPS (io.max) on vda"


def test_throttle_is_set_joined_and_removed(tmp_path):
    devs = _throttle_or_skip(tmp_path)
    thr = tt.ReadThrottle.create(devs, bps=SLOW, iops=300)
    try:
        assert thr.path.is_dir() and thr.limits()[devs[0].dev] == (SLOW, 300)
        assert thr.describe() == f"storage reads throttled to 4 MB/s, 300 IOPS ({thr.mechanism}) on {devs[0].name}"
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"], preexec_fn=thr.join_self)
        time.sleep(0.1)
        assert str(proc.pid) in (thr.path / "cgroup.procs").read_text().split()
        proc.wait()
    finally:
        thr.close()
    assert not thr.path.exists()
    thr.close()  # again: harmless
    with pytest.raises(RuntimeError), tt.ReadThrottle.create(devs, bps=SLOW) as t2:  # an error inside: removed
        raise RuntimeError("boom")
    assert not t2.path.exists() and not _leftovers()


def test_probe_measures_the_limit(tiny):
    f = tiny / "model.gguf"
    devs = _throttle_or_skip(f)
    info = prepare_throttle([f], bps=SLOW)
    assert info["throttled"], info
    p = info["probe"]
    assert p["bytes"] == min(f.stat().st_size, SLOW) and p["cgroup_bytes"] >= p["bytes"] // 2
    assert p["bps"] < 1.3 * SLOW  # throttled: well below this disk's speed
    assert info["devices"] == [{"device": devs[0].name, "dev": devs[0].dev}] and not _leftovers()


def test_iops_probe_measures_the_limit(tiny):
    """Random single-page reads at 200 IOPS: the cgroup counts one I/O per read and they take the time the
    limit says (a 100 ms burst aside); without the limit the same reads run far faster."""
    f = tiny / "experts.Q8_0.gguf"
    _throttle_or_skip(f)
    info = prepare_throttle([f], iops=200)
    assert info["throttled"], info
    p = info["probe_iops"]
    assert p["reads"] == 200 and p["cgroup_ios"] >= 150 and p["iops"] < 1.3 * 200, p
    assert info["probe"] is None and "200 IOPS" in info["line"] and not _leftovers()


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


def test_worker_faults_are_throttled_by_iops(tiny):
    """Tuned stock (MADV_RANDOM: one 4 KiB read per page fault) under an IOPS limit: every fault is one
    throttled I/O, so decoding takes at least faults ÷ limit — what an SD card's ~0.5 ms per read costs."""
    devs = _throttle_or_skip(tiny / "model.gguf")
    r = run_worker(_cfg(tiny, name="tuned", tokens=64, threads=1, madv_random=True), None, 300, read_iops=400,
                   read_devices=devs)
    assert r["ok"] and r["throttled"] and r["read_iops"] == 400 and r["read_bps"] is None, r
    assert r["throttle_read_ios"] >= r["major_faults_load"] + r["major_faults_prompt"] + r["major_faults_decode"] - 8
    ios = r["throttle_read_ios"]
    assert r["elapsed_s"] >= 0.7 * ios / 400, (r["elapsed_s"], ios)  # one 100 ms slice may burst
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
    res["read_iops"] = throttle and throttle.get("read_iops")
    res["throttle"] = throttle
    for r in res["runs"]:
        r["throttled"] = bool(throttle and throttle["throttled"])
    add_ratios(res["runs"])
    res["headline"] = headline(res["runs"], 0.5, True, res["read_bps"], throttle and throttle["throttled"],
                               read_iops=res["read_iops"])
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
    res = _recorded(thr | {"read_iops": 2000, "probe_iops": {"bytes": 8192000, "seconds": 1.0, "reads": 2000,
                                                              "iops": 1990.0, "bps": 8e6}}) | {"storage": "sd"}
    line = report.render_markdown(res).splitlines()[1]
    assert line.startswith("Throttled: storage reads throttled to 90 MB/s, 2000 IOPS, the 'sd' profile: Raspberry Pi 5 "
                           "microSD card (~90 MB/s, ~2k IOPS) (blkio)") and "2000 random 4 KiB reads" in line
    assert res["headline"]["read_iops"] == 2000
    res = _recorded(thr)
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
                                 read_iops="1500", cache_root=tmp_path / "cache"), log=lambda s: None)
    assert res["read_bps"] == 20_000_000 and res["read_iops"] == 1500 and res["throttle"]["throttled"], res["throttle"]
    assert res["headline"]["read_bps"] == 20_000_000 and res["headline"]["throttled"] is True
    assert all(r["ok"] and r["throttled"] and r["throttle_read_bytes"] > 0 and r["read_iops"] == 1500
               for r in res["runs"]), res["runs"]
    bw = res["read_bandwidth"]  # measured through the same throttle
    assert bw["throttled"] and bw["bps"] and bw["throttle_read_bytes"] >= bw["bytes"] // 2, bw
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    mech = res["throttle"]["mechanism"]
    assert md[1].startswith(f"Throttled: storage reads throttled to 20 MB/s, 1500 IOPS ({mech}) on {devs[0].name}")
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
