"""Every platform call the runtime makes on files and memory: mmap, madvise, mincore, posix_fadvise,
pread, the bytes this process read from storage, this process's mappings of a file, dropping a
file from the page cache. Each call takes the fallback :mod:`.platform`'s capability table names
where the OS lacks it (macOS: no posix_fadvise, /proc/self/io or /proc/self/maps).

Page size: ``vm.PAGE`` is the system's (sysconf), read at run time. :func:`simulated_page_size`
makes every range be rounded as a kernel with larger pages would round it (tests run the pager on
16 KiB pages on a 4 KiB kernel): starts round down and ends up to the simulated page, reads cover
whole simulated pages, and mincore gives one entry per simulated page, resident when any of its
system pages is (a 16 KiB kernel holds the whole page). :class:`Mapping` rounds in *file offsets*:
what the kernel does for a mapping, whose base is page-aligned, and still exact under a simulated
page size, where a mapping's base is aligned to the system's page only. Calls on a mapping never go
past the system pages the range itself covers (the owner of the mapping may have unmapped the rest).

File-backed mappings and ``MADV_FREE``: not used. On Linux it applies to private anonymous pages
only (EINVAL on a shared file mapping); on macOS it marks pages reusable with undefined contents,
which is meant for anonymous memory. Eviction is ``MADV_PAGEOUT`` (or ``MADV_COLD``) where Linux
has it, then ``MADV_DONTNEED`` (Linux: unmaps the range here; macOS: lowers the pages' priority),
then the file range is dropped from the page cache: ``posix_fadvise(DONTNEED)``, or where there is
no fadvise ``msync(MS_INVALIDATE)`` on a mapping of it (how vmtouch evicts on macOS; Linux ignores
MS_INVALIDATE). Prefetch reads with pread, large I/Os through the file's read path, rather than
faulting pages in through a ``MADV_RANDOM`` mapping.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

import numpy as np

from dymoe_gguf._native import pages
from dymoe_gguf._native.fileio import (  # noqa: F401 - re-exported: callers name them vm.X
    drop_file_cache,
    drop_range,
    file_mappings,
    mapped_library,
    no_read_ahead,
    read_bytes,
    read_file_ranges,
    read_range,
)
from dymoe_gguf._native.pages import SYSTEM_PAGE, page_size, simulated_page_size, span  # noqa: F401
from dymoe_gguf._native.platform import (  # noqa: F401
    IS_LINUX,
    MADV_COLD,
    MADV_DONTNEED,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_RANDOM,
    MADV_WILLNEED,
    MAP_FAILED,
    MS_INVALIDATE,
    capabilities,
    libc,
)

fadvise_dontneed = drop_range  # the name the pager used before


def __getattr__(name: str) -> int:
    if name == "PAGE":  # read at each use, so a simulated page size reaches every caller
        return pages.page_size()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _madvise(addr: int, n: int, advice: int | None) -> int:
    if advice is None:
        return errno.EINVAL
    if libc.madvise(addr, n, advice) != 0:
        return ctypes.get_errno()
    return 0


def _mincore(addr: int, n_real: int, n: int) -> np.ndarray:
    """Residency per vm page of ``[addr, addr+n)``, measured on its first ``n_real`` bytes."""
    vec = np.zeros(n // SYSTEM_PAGE, dtype=np.uint8)
    if n_real > 0 and libc.mincore(addr, n_real, vec.ctypes.data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    vec &= 1
    ratio = pages.page_size() // SYSTEM_PAGE
    return vec if ratio == 1 else vec.reshape(-1, ratio).max(axis=1)


def madvise(addr: int, length: int, advice: int | None) -> int:
    """madvise on the pages covering ``[addr, addr+length)`` of a mapping with a page-aligned base;
    returns 0 or errno (EINVAL for an advice this platform lacks)."""
    start, _end, real_end = pages.covering(addr, length)
    return _madvise(start, real_end - start, advice)


def mincore(addr: int, length: int) -> np.ndarray:
    """Residency (uint8 per page, 1 = resident) of the pages covering ``[addr, addr+length)``."""
    start, end, real_end = pages.covering(addr, length)
    return _mincore(start, real_end - start, end - start)


@dataclass
class Mapping:
    """A read-only shared mapping of a whole file (:meth:`open`), or llama.cpp's mapping of one
    (:meth:`borrow`, never unmapped here). Methods take file offsets."""

    path: str
    fd: int
    addr: int
    size: int
    owned: bool = True  # the mapping is ours to unmap
    owns_fd: bool = True  # and the descriptor ours to close

    @classmethod
    def open(cls, path: str) -> Mapping:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
        m = cls(str(path), fd, int(addr), size)
        m.advise(0, size, MADV_RANDOM)  # no fault read-ahead: we read experts in bulk ourselves
        # and no read-ahead on our preads either: without it a pread of one expert makes the kernel
        # read on into the next ones (read_ahead_kb), which costs reads and budget
        no_read_ahead(fd)
        return m

    @classmethod
    def borrow(cls, path: str | os.PathLike[str], addr: int, fd: int | None = None) -> Mapping:
        """llama.cpp's mapping of ``path``, whose file offset 0 is at ``addr`` (parts of it may be
        unmapped: only ranges of its tensors are touched); ``fd``: a descriptor of the file to use
        (its owner closes it), else one is opened, without read-ahead."""
        if fd is not None:
            return cls(str(path), fd, int(addr), os.fstat(fd).st_size, owned=False, owns_fd=False)
        fd = os.open(path, os.O_RDONLY)
        no_read_ahead(fd)
        return cls(str(path), fd, int(addr), os.fstat(fd).st_size, owned=False)

    def close(self) -> None:
        if self.fd >= 0:
            if self.owned and self.addr:
                libc.munmap(self.addr, self.size)
            if self.owns_fd:
                os.close(self.fd)
            self.fd, self.addr = -1, 0

    def advise(self, offset: int, length: int, advice: int | None) -> int:
        """madvise on the pages covering a file range; returns 0 or errno."""
        start, _end, real_end = pages.covering(offset, length)
        return _madvise(self.addr + start, real_end - start, advice)

    def pages(self, offset: int, length: int) -> np.ndarray:
        """uint8 per page covering a file range: 1 where resident."""
        start, end, real_end = pages.covering(offset, length)
        return _mincore(self.addr + start, real_end - start, end - start)

    def residency(self) -> np.ndarray:
        """uint8 per page of the file: 1 where resident."""
        return self.pages(0, self.size)

    def prefetch(self, offset: int, length: int) -> None:
        """Bring a byte range into the page cache in large reads (blocking; pager or safe point).

        ``pread`` on the file takes the file's read path (large I/Os); ``MADV_POPULATE_READ`` on
        this MADV_RANDOM mapping would fault the range in one page at a time. The mapping then
        finds the pages cached (minor faults only).
        """
        read_range(self.fd, offset, length, self.size)

    def populate(self, offset: int, length: int) -> str:
        """Map a range in now (``MADV_POPULATE_READ``), or hint and read it (``MADV_WILLNEED`` +
        pread) where that is missing; returns which."""
        caps = capabilities()
        if caps.madv_populate_read and self.advise(offset, length, MADV_POPULATE_READ) == 0:
            return "MADV_POPULATE_READ"
        if caps.madv_willneed:
            self.advise(offset, length, MADV_WILLNEED)
        read_range(self.fd, offset, length, self.size)
        return "pread"

    def evict(self, offset: int, length: int) -> tuple[str, ...]:
        """Drop a byte range from this process and, where nothing else maps it, from the page
        cache; returns the calls that did it."""
        caps = capabilities()
        done = []
        if caps.madv_pageout and self.advise(offset, length, MADV_PAGEOUT) == 0:
            done.append("MADV_PAGEOUT")
        elif caps.madv_cold and self.advise(offset, length, MADV_COLD) == 0:
            done.append("MADV_COLD")
        if caps.madv_dontneed and self.advise(offset, length, MADV_DONTNEED) == 0:
            done.append("MADV_DONTNEED")
        done.append(self.drop(offset, length))
        return tuple(done)

    def drop(self, offset: int, length: int) -> str:
        """Drop the file pages covering a range from the page cache; returns the call used."""
        if capabilities().posix_fadvise:
            return drop_range(self.fd, offset, length)
        start, _end, real_end = pages.covering(offset, length)
        if capabilities().msync_invalidate and libc.msync(self.addr + start, real_end - start, MS_INVALIDATE) == 0:
            return "msync"
        return "none"
