"""Calls on file descriptors and on this process (re-exported by :mod:`.vm`): read-ahead off, bulk
reads into the page cache, dropping file ranges from it, the bytes this process read from storage,
and this process's mappings — each with its fallback where the platform lacks the call.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from dymoe_gguf._native import pages, platform
from dymoe_gguf._native.platform import F_RDAHEAD, MAP_FAILED, MS_INVALIDATE, capabilities, libc

_local = threading.local()


def no_read_ahead(fd: int) -> str:
    """Switch read-ahead off for reads on ``fd``; returns the call used (``"none"`` where none can)."""
    caps = capabilities()
    try:
        if caps.posix_fadvise:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return "posix_fadvise"
        if caps.f_rdahead:
            import fcntl

            fcntl.fcntl(fd, F_RDAHEAD, 0)
            return "F_RDAHEAD"
    except OSError:
        pass
    return "none"


def drop_range(fd: int, offset: int = 0, length: int = 0) -> str:
    """Drop the pages covering a file range (``length`` 0: to the end) from the page cache, where
    nothing maps them: ``posix_fadvise(DONTNEED)``, else ``msync(MS_INVALIDATE)`` on a temporary
    mapping of the range. Returns the call used (``"none"`` where nothing worked)."""
    caps = capabilities()
    if length == 0:
        length = os.fstat(fd).st_size - offset
    if length <= 0:  # posix_fadvise would take a length of 0 for "to the end"
        return "none"
    start, end, real_end = pages.covering(offset, length)
    if caps.posix_fadvise:
        try:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            return "posix_fadvise"
        except OSError:
            return "none"
    if caps.msync_invalidate and real_end > start:
        addr = libc.mmap(None, real_end - start, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr not in (None, MAP_FAILED):
            try:
                if libc.msync(addr, real_end - start, MS_INVALIDATE) == 0:
                    return "msync"
            finally:
                libc.munmap(addr, real_end - start)
    return "none"


def drop_file_cache(path: str) -> str:
    """Evict a whole file from the page cache (cold-cache benchmarks); returns the call used."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return drop_range(fd)
    finally:
        os.close(fd)


def _scratch(n: int) -> memoryview:
    """A per-thread reusable buffer of at least ``n`` bytes (prefetch reads land here)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = memoryview(bytearray(max(n, 1 << 20)))
        _local.buf = buf
    return buf


def read_range(fd: int, offset: int, length: int, size: int) -> int:
    """Read the pages covering ``[offset, offset+length)`` of a file of ``size`` bytes into the page
    cache with large ``preadv`` (else ``pread``) calls, the data discarded; returns the bytes read."""
    start, end, _ = pages.covering(offset, length)
    n = min(end, size) - start
    if n <= 0:
        return 0
    chunk = min(n, 8 << 20)
    buf = _scratch(chunk) if capabilities().preadv else None
    done = 0
    while done < n:
        want = min(chunk, n - done)
        got = os.preadv(fd, [buf[:want]], start + done) if buf is not None else len(os.pread(fd, want, start + done))
        if got <= 0:
            break
        done += got
    return done


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
        no_read_ahead(fd)
        size = os.fstat(fd).st_size
        for off, n in merged:
            read_range(fd, off, n, size)
    finally:
        os.close(fd)


def _maps() -> Iterator[tuple[int, int, int, str]]:
    """(address, length, file offset, path) of this process's file mappings (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6:
                a, b = (int(x, 16) for x in parts[0].split("-"))
                yield a, b - a, int(parts[2], 16), parts[5].strip()


def file_mappings(path: str) -> list[tuple[int, int, int]]:
    """(address, length, file offset) of this process's mappings of ``path``; empty where the
    platform does not list mappings (``capabilities().proc_self_maps``)."""
    if not capabilities().proc_self_maps:
        return []
    real = os.path.realpath(path)
    try:
        return [(a, n, off) for a, n, off, p in _maps() if p == real]
    except OSError:
        return []


def mapped_library(fragment: str) -> str | None:
    """Path of a loaded shared library whose file name contains ``fragment``, where the platform
    lists mappings; None otherwise."""
    if not capabilities().proc_self_maps:
        return None
    try:
        return next((p for _a, _n, _off, p in _maps() if fragment in Path(p).name), None)
    except OSError:
        return None


def read_bytes() -> int | None:
    """Bytes this process caused to be read from storage: /proc/self/io, else psutil's io
    counters, else proc_pid_rusage (macOS); None where the platform does not say (never 0)."""
    caps = capabilities()
    for present, read in ((caps.proc_self_io, platform.proc_io_read_bytes),
                          (caps.psutil_io, platform.psutil_read_bytes),
                          (caps.rusage_diskio, platform.rusage_diskio_read)):
        if present:
            n = read()
            if n is not None:
                return n
    return None
