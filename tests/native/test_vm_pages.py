"""The page size comes from the system, everywhere; and a simulated larger page rounds every range as
a kernel with that page would (checked against this kernel's own pages)."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from dymoe_gguf._native import platform, vm

ROOT = Path(__file__).resolve().parents[2]
P16 = 16384
sim16 = pytest.mark.skipif(vm.SYSTEM_PAGE > P16, reason="simulates 16 KiB pages on a kernel with smaller ones")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="drops the page cache with posix_fadvise")


def cold_file(path, size: int):
    """A file of ``size`` random bytes, written to disk and out of the page cache."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    assert vm.drop_file_cache(str(path)) == "posix_fadvise"
    assert kernel_residency(path).sum() == 0, "the page cache could not be dropped here"
    return path


def kernel_residency(path) -> np.ndarray:
    """Page-cache residency of a file per system page, measured without vm: libc's own mmap and
    mincore on a fresh mapping (the ground truth)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = np.zeros(-(-size // page), dtype=np.uint8)
            assert libc.mincore(addr, size, vec.ctypes.data) == 0
            return vec & 1
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_page_size_is_the_systems():
    assert vm.PAGE == vm.page_size() == vm.SYSTEM_PAGE == os.sysconf("SC_PAGE_SIZE")
    assert platform.capabilities().page_size == vm.SYSTEM_PAGE


def test_no_module_has_its_own_page_size():
    """Only _native/pages.py (and the capability probe) ask the system for the page size, and no
    paging code hard-codes one (4096 or 16384 next to "page" or in page arithmetic): everything
    rounds with vm's, so a 16 KiB kernel — or a simulated 16 KiB page — reaches every range."""
    asks = re.compile(r"PAGESIZE|SC_PAGE_?SIZE|getpagesize|PAGE_SIZE")
    allowed = {"dymoe_gguf/_native/pages.py", "dymoe_gguf/_native/platform.py",
               "dymoe_gguf/bench/run.py"}  # bench records the system's page size in its report
    size = r"(?<![\w.])(?:4096|16384)(?![\w.])"  # a page size written out: near "page", or in page arithmetic
    literal = re.compile(rf"(?i:page).*{size}|{size}.*(?i:page)|[%/*]\s*{size}|{size}\s*[%/*]")
    offenders = []
    for f in sorted((ROOT / "dymoe_gguf").rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        text = f.read_text()
        if asks.search(text) and rel not in allowed:
            offenders.append(f"{rel}: reads the page size")
        paging = rel.startswith(("dymoe_gguf/runtime/", "dymoe_gguf/_native/")) and rel not in allowed
        for m in literal.finditer(text) if paging else ():
            offenders.append(f"{rel}:{text[:m.start()].count(chr(10)) + 1}: {m.group()}")
    assert not offenders, offenders


def test_simulated_page_size_is_checked_and_restored():
    for bad in (vm.SYSTEM_PAGE // 2, 3 * vm.SYSTEM_PAGE, vm.SYSTEM_PAGE + 1):
        with pytest.raises(ValueError, match="power of two"):
            with vm.simulated_page_size(bad):
                pass
    with vm.simulated_page_size(4 * vm.SYSTEM_PAGE):
        assert vm.PAGE == 4 * vm.SYSTEM_PAGE
    assert vm.PAGE == vm.SYSTEM_PAGE


@sim16
def test_span_rounds_out_to_the_page():
    with vm.simulated_page_size(P16):
        assert vm.span(0, 1) == P16 and vm.span(P16, P16) == P16 and vm.span(P16 - 1, 2) == 2 * P16
        assert vm.span(0, 73728) == 5 * P16  # a Q4_K expert matrix of the shipped model: 4.5 pages
        off = np.array([0, P16, 3 * P16])
        assert vm.span(off, np.array([1, P16 + 1, 2 * P16])).tolist() == [P16, 2 * P16, 2 * P16]
    if vm.SYSTEM_PAGE == 4096:
        assert vm.span(0, 73728) == 73728


@linux
def test_vm_measures_what_the_kernel_holds(tmp_path):
    """At the system's page size vm's residency is the kernel's (the ground truth later tests use)."""
    path = cold_file(tmp_path / "f.bin", 16 * vm.SYSTEM_PAGE)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    for p in (1, 2, 7, 15):
        os.pread(fd, 1, p * vm.SYSTEM_PAGE + 3)
    os.close(fd)
    m = vm.Mapping.open(str(path))
    try:
        got = m.residency()
        assert np.flatnonzero(got).tolist() == [1, 2, 7, 15]
        assert m.pages(2 * vm.SYSTEM_PAGE + 1, vm.SYSTEM_PAGE).tolist() == [1, 0]
    finally:
        m.close()
    assert np.array_equal(got, kernel_residency(path))


@sim16
@linux
def test_a_simulated_16k_page_against_this_kernels_pages(tmp_path):
    """Reads cover whole 16 KiB pages; mincore answers per 16 KiB page (resident when any of its
    system pages is, as a 16 KiB kernel would hold all of it); eviction drops whole 16 KiB pages
    and nothing of the next one — all checked at this kernel's page size."""
    ratio = P16 // vm.SYSTEM_PAGE
    path = cold_file(tmp_path / "f.bin", 8 * P16)

    def truth() -> np.ndarray:
        return kernel_residency(path)

    with vm.simulated_page_size(P16):
        m = vm.Mapping.open(str(path))
        try:
            m.prefetch(P16 + 100, 10)  # 10 bytes inside 16 KiB page 1
            got = truth()
            assert got[ratio:2 * ratio].all() and got.sum() == ratio  # the whole page, nothing else
            assert m.residency().tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
            assert m.pages(P16 + 100, 10).tolist() == [1] and m.pages(0, 2 * P16).tolist() == [0, 1]
            # one system page of 16 KiB page 3 brought in behind our back: page 3 counts as resident
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 1, 3 * P16 + vm.SYSTEM_PAGE)
            os.close(fd)
            assert m.residency().tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
            m.prefetch(4 * P16, 2 * P16)
            m.evict(P16 + 5, 1)  # one byte of page 1: the kernel drops the whole page
            assert m.residency().tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
            m.evict(4 * P16, P16 + 1)  # page 4 and one byte of 5: both pages go
            assert m.residency().tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
        finally:
            m.close()
    got = truth()
    assert got[3 * ratio:4 * ratio].sum() == 1 and got.sum() == 1  # only the page read behind our back
