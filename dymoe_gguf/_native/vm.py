"""Virtual-memory calls the pager needs: mmap, madvise, mincore, posix_fadvise, via libc.

Linux and macOS. Page size is read at run time. Prefetch reads with pread (large I/Os through the
file's read path) rather than faulting pages in through a MADV_RANDOM mapping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

PAGE = mmap.PAGESIZE
IS_LINUX = sys.platform.startswith("linux")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
# void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset);
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.mmap.restype = ctypes.c_void_p
# int munmap(void *addr, size_t length);
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
# int madvise(void *addr, size_t length, int advice);
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
# int mincore(void *addr, size_t length, unsigned char *vec);
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
if hasattr(_libc, "posix_fadvise"):
    # int posix_fadvise(int fd, off_t offset, off_t len, int advice);
    _libc.posix_fadvise.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]

MAP_FAILED = ctypes.c_void_p(-1).value
MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_DONTNEED = 0, 1, 2, 3, 4
MADV_COLD, MADV_PAGEOUT, MADV_POPULATE_READ = 20, 21, 22  # Linux only
POSIX_FADV_RANDOM, POSIX_FADV_DONTNEED = 1, 4

_local = threading.local()


def _scratch(n: int) -> memoryview:
    """A per-thread reusable buffer of at least ``n`` bytes (prefetch reads land here)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = memoryview(bytearray(max(n, 1 << 20)))
        _local.buf = buf
    return buf


def _round(addr: int, length: int) -> tuple[int, int]:
    start = addr - addr % PAGE
    end = addr + length
    end += -end % PAGE
    return start, end - start


@dataclass
class Mapping:
    """A read-only shared mapping of a whole file."""

    path: str
    fd: int
    addr: int
    size: int

    @classmethod
    def open(cls, path: str) -> Mapping:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
        m = cls(path, fd, int(addr), size)
        m.advise(0, size, MADV_RANDOM)  # no fault read-ahead: we read experts in bulk ourselves
        # and no read-ahead on our preads either: without this a pread of one expert makes the
        # kernel read on into the next ones (read_ahead_kb), which costs reads and budget
        fadvise(fd, 0, 0, POSIX_FADV_RANDOM)
        return m

    def close(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.size)
            os.close(self.fd)
            self.addr = 0

    def advise(self, offset: int, length: int, advice: int) -> int:
        """madvise on [offset, offset+length) of the file; returns 0 or errno."""
        return madvise(self.addr + offset, length, advice)

    def residency(self) -> np.ndarray:
        """uint8 per page: 1 where resident."""
        return mincore(self.addr, self.size)

    def prefetch(self, offset: int, length: int) -> None:
        """Bring a byte range into the page cache in large reads (blocking; pager or safe point).

        ``pread`` on the file takes the file's read path (large I/Os); ``MADV_POPULATE_READ`` on
        this MADV_RANDOM mapping would fault the range in one page at a time. The mapping then
        finds the pages cached (minor faults only).
        """
        read_range(self.fd, offset, length, self.size)

    def evict(self, offset: int, length: int) -> None:
        """Drop a byte range from this process and, where unmapped elsewhere, from the page cache."""
        start, n = _round(self.addr + offset, length)
        if IS_LINUX and madvise(start, n, MADV_PAGEOUT) == 0:
            pass
        madvise(start, n, MADV_DONTNEED)
        # the kernel drops only whole pages inside the range: round it out to pages
        fstart, fn = _round(offset, length)
        fadvise_dontneed(self.fd, fstart, fn)


def read_range(fd: int, offset: int, length: int, size: int) -> None:
    """Read the pages of ``[offset, offset+length)`` of a file of ``size`` bytes into the page cache
    with large ``pread`` calls (the data is discarded)."""
    start, n = _round(offset, length)
    n = min(n, size - start)
    if n <= 0:
        return
    chunk = min(n, 8 << 20)
    buf = _scratch(chunk)
    done = 0
    while done < n:
        got = os.preadv(fd, [buf[:min(chunk, n - done)]], start + done)
        if got <= 0:
            break
        done += got


def read_file_ranges(path: str, ranges: list[tuple[int, int]], gap: int = 1 << 16) -> None:
    """Read (offset, length) ranges of a file into the page cache, ranges that (nearly) touch merged
    into one read, through a descriptor without read-ahead (nothing beyond the ranges is read)."""
    merged: list[list[int]] = []
    for off, n in sorted(ranges):
        if merged and off - (merged[-1][0] + merged[-1][1]) <= gap:
            merged[-1][1] = max(merged[-1][1], off + n - merged[-1][0])
        else:
            merged.append([off, n])
    fd = os.open(path, os.O_RDONLY)
    try:
        fadvise(fd, 0, 0, POSIX_FADV_RANDOM)
        size = os.fstat(fd).st_size
        for off, n in merged:
            read_range(fd, off, n, size)
    finally:
        os.close(fd)


def file_mappings(path: str) -> list[tuple[int, int, int]]:
    """(address, length, file offset) of this process's mappings of ``path`` (Linux /proc/self/maps;
    empty elsewhere)."""
    real = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real:
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    out.append((a, b - a, int(parts[2], 16)))
    except OSError:
        pass
    return out


def madvise(addr: int, length: int, advice: int) -> int:
    """madvise on a page-rounded range; returns 0 or errno."""
    start, n = _round(addr, length)
    if _libc.madvise(start, n, advice) != 0:
        return ctypes.get_errno()
    return 0


def mincore(addr: int, length: int) -> np.ndarray:
    """Residency (uint8 per page, 1 = resident) of a page-rounded range of a mapping."""
    start, n = _round(addr, length)
    vec = np.zeros(n // PAGE, dtype=np.uint8)
    if _libc.mincore(start, n, vec.ctypes.data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return vec & 1


def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
    """posix_fadvise where the platform has it (not macOS); best effort."""
    if hasattr(_libc, "posix_fadvise"):
        _libc.posix_fadvise(fd, offset, length, advice)


def fadvise_dontneed(fd: int, offset: int = 0, length: int = 0) -> None:
    """posix_fadvise(DONTNEED) where the platform has it (not macOS)."""
    fadvise(fd, offset, length, POSIX_FADV_DONTNEED)


def drop_file_cache(path: str) -> None:
    """Evict a whole file from the page cache (cold-cache benchmarks); best effort."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fadvise_dontneed(fd)
    finally:
        os.close(fd)


def read_bytes() -> int:
    """Bytes this process caused to be read from storage (/proc/self/io; 0 where unavailable)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
