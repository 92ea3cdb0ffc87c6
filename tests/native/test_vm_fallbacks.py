"""Each fallback of vm, forced on Linux: the capability table says a call is missing
(``platform.without``) and the fallback path runs for real, on real files and mappings, checked by
what the kernel then holds (mincore on a fresh mapping, this process's Rss from /proc/self/smaps).

Where the fallback is a macOS call (F_RDAHEAD, msync invalidation dropping the page cache,
proc_pid_rusage), Linux can only run the path up to that call: Linux has no F_RDAHEAD and ignores
MS_INVALIDATE, which the tests say where they rely on it.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import psutil
import pytest

from dymoe_gguf._native import platform, vm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forces the fallbacks on Linux")
NPAGES = 32


@pytest.fixture
def data(tmp_path):
    """A file of 32 system pages of random bytes, out of the page cache."""
    path = tmp_path / "data.bin"
    payload = np.random.default_rng(0).integers(0, 256, NPAGES * vm.SYSTEM_PAGE, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert vm.drop_file_cache(str(path)) == "posix_fadvise"
    assert _cached(path).sum() == 0, "the page cache could not be dropped here"
    return path, payload


def _cached(path) -> np.ndarray:
    """Page-cache residency of a file per system page, on a fresh mapping of our own."""
    m = vm.Mapping.open(str(path))
    try:
        return m.residency()
    finally:
        m.close()


def _rss(addr: int) -> int:
    """Resident bytes of this process's mapping at ``addr`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = iter(f)
        for line in lines:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0] and int(line.split("-")[0], 16) == addr:
                for field in lines:
                    if field.startswith("Rss:"):
                        return int(field.split()[1]) * 1024
    raise AssertionError(f"no mapping at {addr:#x}")


def _touch(m: vm.Mapping) -> bytes:
    return ctypes.string_at(m.addr, m.size)  # faults every page into this mapping


def test_the_probe_finds_this_kernels_calls():
    caps = platform.capabilities()
    assert caps.page_size == os.sysconf("SC_PAGE_SIZE") == vm.SYSTEM_PAGE == vm.PAGE
    for present in ("mmap", "madv_random", "madv_willneed", "madv_dontneed", "mincore", "msync_invalidate",
                    "posix_fadvise", "preadv", "proc_self_io", "psutil_io", "proc_self_maps"):
        assert getattr(caps, present), present
    assert not caps.f_rdahead and not caps.rusage_diskio  # macOS calls
    major, minor = (int(x) for x in caps.kernel.split(".")[:2])
    assert caps.madv_populate_read == ((major, minor) >= (5, 14))
    assert caps.madv_pageout == caps.madv_cold == ((major, minor) >= (5, 4))


def test_without_switches_capabilities_off_only_inside():
    with platform.without("posix_fadvise", "proc_self_io") as caps:
        assert platform.capabilities() is caps and not caps.posix_fadvise and not caps.proc_self_io
        with platform.without("preadv"):
            assert not platform.capabilities().preadv and not platform.capabilities().posix_fadvise
        assert platform.capabilities().preadv
    assert platform.capabilities().posix_fadvise
    with pytest.raises(ValueError, match="Expected capability names"):
        with platform.without("fadvise"):
            pass


def test_no_posix_fadvise_read_ahead_off_is_skipped_and_drop_is_msync(data):
    """macOS: no posix_fadvise. Read-ahead off takes F_RDAHEAD (absent on Linux: "none"); a range
    is dropped with msync(MS_INVALIDATE) on the mapping after MADV_DONTNEED has unmapped it here."""
    path, payload = data
    with platform.without("posix_fadvise") as caps:
        m = vm.Mapping.open(str(path))
        try:
            assert vm.no_read_ahead(m.fd) == "none"
            assert _touch(m) == payload and _rss(m.addr) == len(payload)
            how = m.evict(0, m.size)
            assert how == (("MADV_PAGEOUT",) if caps.madv_pageout else ()) + ("MADV_DONTNEED", "msync")
            assert _rss(m.addr) == 0  # unmapped from this process
            assert _touch(m) == payload  # and the mapping still reads the file
            assert vm.drop_range(m.fd, 0, 0) == "msync"
            assert vm.fadvise_dontneed(m.fd, vm.SYSTEM_PAGE, vm.SYSTEM_PAGE) == "msync"
        finally:
            m.close()
        assert vm.drop_file_cache(str(path)) == "msync"
    assert vm.drop_file_cache(str(path)) == "posix_fadvise" and _cached(path).sum() == 0


@pytest.mark.parametrize("missing, expect", [
    ((), ("MADV_PAGEOUT", "MADV_DONTNEED", "posix_fadvise")),
    (("madv_pageout",), ("MADV_COLD", "MADV_DONTNEED", "posix_fadvise")),
    (("madv_pageout", "madv_cold"), ("MADV_DONTNEED", "posix_fadvise")),
])
def test_eviction_without_pageout_or_cold(data, missing, expect):
    """No MADV_PAGEOUT (Linux < 5.4, macOS): MADV_COLD, else MADV_DONTNEED + fadvise — and the
    evicted pages, all of them and only them, leave this process and the page cache."""
    if not platform.capabilities().madv_pageout:
        pytest.skip("this kernel has no MADV_PAGEOUT/MADV_COLD")
    path, payload = data
    half = NPAGES // 2 * vm.SYSTEM_PAGE
    with platform.without(*missing):
        m = vm.Mapping.open(str(path))
        try:
            m.prefetch(0, m.size)
            assert _touch(m) == payload and _cached(path).all()
            assert m.evict(0, half) == expect
            assert _rss(m.addr) == len(payload) - half
        finally:
            m.close()
    cached = _cached(path)
    assert cached[: NPAGES // 2].sum() == 0 and cached[NPAGES // 2:].all()


@pytest.mark.parametrize("missing", [("madv_populate_read",), ("madv_populate_read", "madv_willneed")])
def test_no_populate_read_hints_and_reads(data, missing):
    """No MADV_POPULATE_READ (Linux < 5.14, macOS): MADV_WILLNEED + pread of the range (pread alone
    where there is no WILLNEED either), which is then cached — and nothing around it (the
    descriptor has read-ahead off)."""
    path, _payload = data
    lo, n = 4 * vm.SYSTEM_PAGE, 8 * vm.SYSTEM_PAGE
    owner = vm.Mapping.open(str(path))  # stands for llama.cpp, whose mapping the loader borrows
    try:
        with platform.without(*missing):
            m = vm.Mapping.borrow(path, owner.addr)
            try:
                assert m.populate(lo, n) == "pread"
            finally:
                m.close()
        assert _rss(owner.addr) == 0  # read into the page cache, not mapped in
    finally:
        owner.close()
    cached = _cached(path)
    assert cached[4:12].all() and cached[:4].sum() == 0 and cached[12:].sum() == 0


def test_populate_read_maps_the_range_in_where_the_kernel_has_it(data):
    if not platform.capabilities().madv_populate_read:
        pytest.skip("this kernel has no MADV_POPULATE_READ")
    path, _payload = data
    m = vm.Mapping.open(str(path))
    try:
        assert m.populate(0, 8 * vm.SYSTEM_PAGE) == "MADV_POPULATE_READ"
        assert _rss(m.addr) == 8 * vm.SYSTEM_PAGE  # in this mapping's page tables, not only cached
    finally:
        m.close()


def test_no_preadv_reads_with_pread(data):
    """No os.preadv (Python on macOS < 11): pread, a new buffer per read, same pages read."""
    path, _payload = data
    fd = os.open(path, os.O_RDONLY)
    try:
        vm.no_read_ahead(fd)
        with platform.without("preadv"):
            assert vm.read_range(fd, vm.SYSTEM_PAGE + 1, 3 * vm.SYSTEM_PAGE, os.fstat(fd).st_size) == 4 * vm.SYSTEM_PAGE
    finally:
        os.close(fd)
    cached = _cached(path)
    assert cached[1:5].all() and cached[0] == 0 and cached[5:].sum() == 0


def test_bytes_read_from_psutil_then_unknown(data):
    """No /proc/self/io: psutil's io counters (the same kernel counter on Linux); without those
    either (macOS without proc_pid_rusage): None, not 0."""
    path, payload = data
    proc = vm.read_bytes()
    if proc is None:
        pytest.skip("this kernel does not count storage reads")
    with platform.without("proc_self_io"):
        before = vm.read_bytes()
        assert proc <= before <= psutil.Process().io_counters().read_bytes
        with open(path, "rb", buffering=0) as f:
            assert f.read() == payload
        read = vm.read_bytes() - before
    if read == 0:
        pytest.skip("/proc/self/io does not count reads here")
    assert read >= len(payload)
    with platform.without("proc_self_io", "psutil_io"):
        assert vm.read_bytes() is None


def test_no_proc_self_maps(data):
    """No /proc/self/maps (macOS): no mappings are listed (not a guess), and the patched library is
    still found by name (its RTLD_NOLOAD lookup never loads a second copy)."""
    import llama_cpp  # noqa: F401

    from dymoe_gguf._native import patch

    path, _payload = data
    m = vm.Mapping.open(str(path))
    try:
        assert [a for a, _n, _off in vm.file_mappings(str(path))] == [m.addr]
        with platform.without("proc_self_maps"):
            assert vm.file_mappings(str(path)) == [] and vm.mapped_library("libggml-cpu") is None
            views = patch.load()
    finally:
        m.close()
    assert (views is None) == (patch.load() is None)
    if views is not None:
        assert views.lib._handle == patch.load().lib._handle  # the copy libllama loaded


def test_doctor_prints_the_capability_table():
    """``doctor`` lists every call with what it is for; a missing one with what replaces it; and
    what is verified where, this machine's row marked."""
    from click.testing import CliRunner

    from dymoe_gguf.cli import cli
    from dymoe_gguf.doctor import diagnose, render

    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 0, res.output
    for call in platform.CALLS:
        assert f"  {call.name} " in res.output
    assert f"page {vm.SYSTEM_PAGE} B (sysconf)" in res.output
    assert f"* {platform.VERIFIED[platform.verified_key(platform.capabilities())][0]}: " in res.output
    assert "macOS, Apple Silicon" in res.output and "L4T is a Linux kernel" in res.output
    with platform.without("posix_fadvise", "proc_self_maps"):
        info = diagnose()
        text = render(info)
    rows = {r["call"]: r for r in info["platform_calls"]["calls"]}
    assert not rows["posix_fadvise"]["available"] and rows["fcntl F_RDAHEAD"]["needed"]
    assert "posix_fadvise               NO " in text and "-> instead: F_RDAHEAD 0 (macOS)" in text
    assert "-> instead: the mapping's base from the first weight" in text


def test_madv_free_is_refused_on_a_file_mapping(data):
    """Why vm never uses MADV_FREE on the bundle's mappings: Linux refuses it on a shared file
    mapping (private anonymous pages only)."""
    import errno
    import mmap

    path, _payload = data
    m = vm.Mapping.open(str(path))
    try:
        assert m.advise(0, m.size, mmap.MADV_FREE) == errno.EINVAL
    finally:
        m.close()
