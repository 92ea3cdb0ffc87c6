"""What this OS and kernel offer for paging: the capability table, probed once.

Every platform call the runtime makes goes through :mod:`dymoe_gguf._native.vm`, which asks
:func:`capabilities` whether the call exists here and takes the fallback listed in :data:`CALLS`
where it does not. A call counts as present when it *succeeds* on a small temporary file, not when
a header defines it: a Linux kernel before 5.14 rejects ``MADV_POPULATE_READ`` with EINVAL, one
before 5.4 ``MADV_COLD``/``MADV_PAGEOUT``; macOS has no ``posix_fadvise``, no ``/proc`` and no
cgroups, and Python's ``os.preadv`` needs macOS 11.

Tests switch capabilities off with :func:`without` so that each fallback runs on Linux, against real
files and mappings. A capability can be removed that way, never added.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import mmap
import os
import platform as _platform
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IS_LINUX = sys.platform.startswith("linux")
IS_DARWIN = sys.platform == "darwin"

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
# void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset);
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
libc.mmap.restype = ctypes.c_void_p
# int munmap(void *addr, size_t length);
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
# int madvise(void *addr, size_t length, int advice);
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
# int mincore(void *addr, size_t length, unsigned char *vec);   (char * on macOS: same ABI)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
# int msync(void *addr, size_t length, int flags);
libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value

# advice values as this platform's <sys/mman.h> defines them (Python's mmap module exports them)
MADV_NORMAL = getattr(mmap, "MADV_NORMAL", 0)
MADV_RANDOM = getattr(mmap, "MADV_RANDOM", 1)
MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", 3)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
# Linux only (include/uapi/asm-generic/mman-common.h); the same numbers mean other things elsewhere
MADV_COLD = getattr(mmap, "MADV_COLD", 20) if IS_LINUX else None
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21) if IS_LINUX else None
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if IS_LINUX else None
MS_INVALIDATE = 2  # <sys/mman.h>: 2 on Linux and on macOS
# macOS <sys/fcntl.h>: F_RDAHEAD (read-ahead on/off for a descriptor)
F_RDAHEAD = 45 if IS_DARWIN else None


class RusageInfoV2(ctypes.Structure):
    """macOS <sys/resource.h> struct rusage_info_v2 (proc_pid_rusage, flavor RUSAGE_INFO_V2 = 2)."""

    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [(name, ctypes.c_uint64) for name in (
        "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
        "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
        "ri_proc_exit_abstime", "ri_child_user_time", "ri_child_system_time", "ri_child_pkg_idle_wkups",
        "ri_child_interrupt_wkups", "ri_child_pageins", "ri_child_elapsed_abstime",
        "ri_diskio_bytesread", "ri_diskio_byteswritten")]


RUSAGE_INFO_V2 = 2


def rusage_diskio_read() -> int | None:
    """Bytes this process read from disk (macOS ``proc_pid_rusage``), None where there is no such call."""
    fn = getattr(libc, "proc_pid_rusage", None)
    if fn is None:
        return None
    info = RusageInfoV2()
    # int proc_pid_rusage(int pid, int flavor, rusage_info_t *buffer);
    if fn(ctypes.c_int(os.getpid()), ctypes.c_int(RUSAGE_INFO_V2), ctypes.byref(info)) != 0:
        return None
    return int(info.ri_diskio_bytesread)


@dataclass(frozen=True)
class Capabilities:
    """What this OS/kernel offers for paging (probed once by :func:`capabilities`); :data:`CALLS`
    says what each call is for and what replaces it where it is missing."""

    system: str  # sys.platform: "linux", "darwin", …
    machine: str  # x86_64, aarch64, arm64
    kernel: str  # uname release
    board: str  # "NVIDIA Jetson (L4T, a Linux kernel)", "Raspberry Pi 5 …", or ""
    page_size: int  # bytes, sysconf(_SC_PAGESIZE): 4 KiB on x86-64, 16 KiB on Apple Silicon and Pi 5's default kernel
    mmap: bool
    madv_random: bool
    madv_willneed: bool
    madv_dontneed: bool
    madv_cold: bool
    madv_pageout: bool
    madv_populate_read: bool
    mincore: bool
    msync_invalidate: bool
    posix_fadvise: bool
    f_rdahead: bool
    preadv: bool
    proc_self_io: bool
    psutil_io: bool
    rusage_diskio: bool
    proc_self_maps: bool

    def flags(self) -> dict[str, bool]:
        """The yes/no capabilities by field name."""
        return {c.field: getattr(self, c.field) for c in CALLS}


@dataclass(frozen=True)
class Call:
    """One row of the capability table."""

    field: str  # the Capabilities field
    name: str
    purpose: str
    fallback: str  # what vm does where the call is missing
    instead_of: tuple[str, ...] = ()  # a fallback itself: used only where these calls are all missing


CALLS: tuple[Call, ...] = (
    Call("mmap", "mmap/munmap", "map bundle files read-only and shared", "none: required"),
    Call("madv_random", "madvise MADV_RANDOM", "no fault read-around on the mappings",
         "faults read around: more is read, and dropped again at the pager's next sync"),
    Call("madv_willneed", "madvise MADV_WILLNEED", "hint before the dense weights are read",
         "no hint; the range is read with pread"),
    Call("madv_populate_read", "madvise MADV_POPULATE_READ", "dense weights mapped in at once (Linux >= 5.14)",
         "MADV_WILLNEED + pread of the range"),
    Call("madv_pageout", "madvise MADV_PAGEOUT", "reclaim an evicted range (Linux >= 5.4)",
         "MADV_COLD, else MADV_DONTNEED + dropping the file range"),
    Call("madv_cold", "madvise MADV_COLD", "deactivate an evicted range (Linux >= 5.4)",
         "MADV_DONTNEED + dropping the file range"),
    Call("madv_dontneed", "madvise MADV_DONTNEED", "unmap an evicted range from this process",
         "the pages stay mapped until the kernel reclaims them"),
    Call("mincore", "mincore", "residency of mapped ranges: budget accounting, hit rate", "none: required"),
    Call("posix_fadvise", "posix_fadvise", "RANDOM: no read-ahead on the pager's preads; "
         "DONTNEED: drop evicted ranges from the page cache",
         "F_RDAHEAD 0 (macOS) for read-ahead; msync(MS_INVALIDATE) on a mapping to drop"),
    Call("f_rdahead", "fcntl F_RDAHEAD", "read-ahead off on a descriptor (macOS)", "reads may read ahead",
         ("posix_fadvise",)),
    Call("msync_invalidate", "msync MS_INVALIDATE", "drop a mapped file range (vmtouch's way on macOS; Linux "
         "ignores it)", "the range stays cached until reclaimed", ("posix_fadvise",)),
    Call("preadv", "preadv", "prefetch reads into a reused buffer", "pread (a new buffer per read)"),
    Call("proc_self_io", "/proc/self/io", "bytes this process read from storage (read_bytes)",
         "psutil's io_counters, else proc_pid_rusage (macOS), else unknown (None)"),
    Call("psutil_io", "psutil io_counters", "bytes read (Linux, BSD, Windows)",
         "proc_pid_rusage (macOS), else unknown (None)", ("proc_self_io",)),
    Call("rusage_diskio", "proc_pid_rusage", "bytes read on macOS (ri_diskio_bytesread)", "unknown (None)",
         ("proc_self_io", "psutil_io")),
    Call("proc_self_maps", "/proc/self/maps", "find llama.cpp's mapping of the base file before the "
         "warm-up decode (cold start), and the loaded libggml-cpu",
         "the mapping's base from the first weight the warm-up graph names, before anything is "
         "computed; libggml-cpu by name"),
)

# What is verified where: key -> (platform, how). doctor prints them all and marks this machine's.
VERIFIED: dict[str, tuple[str, str]] = {
    "linux-x86_64-4k": ("Linux x86-64, 4 KiB pages", "natively: the whole test suite (CI)"),
    "linux-16k": ("Linux, 16 KiB pages (Pi 5's default kernel)",
                  "simulated: pager, residency, eviction and cold start with vm's page size at 16 KiB on a 4 KiB "
                  "kernel (tests/runtime/test_pages_16k.py); qemu -p 16384 (scripts/test_aarch64.sh) gives the C test "
                  "16 KiB pages but is no 16 KiB kernel"),
    "linux-aarch64": ("Linux aarch64, 4 KiB pages (Pi 5 with kernel8, Jetson Orin: L4T is a Linux kernel)",
                      "emulated: the patched llama.cpp under qemu-aarch64 (scripts/test_aarch64.sh); the Python "
                      "paging paths are the Linux ones, verified natively on x86-64"),
    "darwin": ("macOS, Apple Silicon (16 KiB pages, no /proc, no cgroups)",
               "never run: its fallbacks (no posix_fadvise, /proc/self/io, /proc/self/maps) are forced on Linux "
               "(tests/native/test_vm_fallbacks.py, tests/runtime/test_pages_platform.py) and 16 KiB pages "
               "simulated; F_RDAHEAD, msync invalidation and proc_pid_rusage themselves never ran; bench has "
               "no memory cap there"),
    "large-pages": ("Linux, pages over 16 KiB (64 KiB aarch64 kernels)",
                    "not verified: bundles are 16 KiB aligned, so experts share pages (an eviction drops "
                    "neighbours too, residency is over-counted)"),
    "other": ("other systems", "not verified"),
}


def verified_key(caps: Capabilities) -> str:
    """Which row of :data:`VERIFIED` applies to ``caps``."""
    if caps.system == "darwin":
        return "darwin"
    if caps.system.startswith("linux"):
        if caps.page_size > 16384:
            return "large-pages"
        if caps.page_size == 16384:
            return "linux-16k"
        return "linux-x86_64-4k" if caps.machine in ("x86_64", "AMD64") else "linux-aarch64"
    return "other"


def _board() -> str:
    if Path("/etc/nv_tegra_release").is_file():
        return "NVIDIA Jetson (L4T, a Linux kernel)"
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        return ""


def proc_io_read_bytes() -> int | None:
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def psutil_read_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().io_counters().read_bytes)
    except (AttributeError, NotImplementedError, OSError, ImportError):  # io_counters: not on macOS
        return None


def probe() -> Capabilities:
    """Try each call on a small temporary file (two pages, mapped here)."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else mmap.PAGESIZE
    found: dict[str, bool] = {}
    with tempfile.NamedTemporaryFile(prefix="dymoe-probe-") as f:
        f.write(os.urandom(2 * page))
        f.flush()
        fd = f.fileno()
        addr = libc.mmap(None, 2 * page, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        found["mmap"] = addr not in (None, MAP_FAILED)
        if found["mmap"]:
            try:
                for field, advice in (("madv_random", MADV_RANDOM), ("madv_willneed", MADV_WILLNEED),
                                      ("madv_populate_read", MADV_POPULATE_READ), ("madv_cold", MADV_COLD),
                                      ("madv_pageout", MADV_PAGEOUT), ("madv_dontneed", MADV_DONTNEED)):
                    found[field] = advice is not None and libc.madvise(addr, 2 * page, advice) == 0
                vec = (ctypes.c_ubyte * 2)()
                found["mincore"] = libc.mincore(addr, 2 * page, vec) == 0
                found["msync_invalidate"] = libc.msync(addr, 2 * page, MS_INVALIDATE) == 0
                found["proc_self_maps"] = _maps_lists(addr, os.path.realpath(f.name))
            finally:
                libc.munmap(addr, 2 * page)
        else:
            found.update(dict.fromkeys(("madv_random", "madv_willneed", "madv_populate_read", "madv_cold",
                                        "madv_pageout", "madv_dontneed", "mincore", "msync_invalidate",
                                        "proc_self_maps"), False))
        found["posix_fadvise"] = _try(lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM))
        found["f_rdahead"] = F_RDAHEAD is not None and _try(lambda: _fcntl(fd, F_RDAHEAD, 0))
    return Capabilities(
        system=sys.platform, machine=_platform.machine(), kernel=_platform.release(), board=_board(),
        page_size=int(page), preadv=hasattr(os, "preadv"), proc_self_io=proc_io_read_bytes() is not None,
        psutil_io=psutil_read_bytes() is not None, rusage_diskio=rusage_diskio_read() is not None, **found)


def _fcntl(fd: int, cmd: int, arg: int) -> None:
    import fcntl

    fcntl.fcntl(fd, cmd, arg)


def _try(fn) -> bool:  # noqa: ANN001
    try:
        fn()
        return True
    except (AttributeError, OSError):
        return False


def _maps_lists(addr: int, path: str) -> bool:
    """Whether /proc/self/maps lists our mapping of ``path`` at ``addr``."""
    try:
        with open("/proc/self/maps") as f:
            return any(int(line.split("-", 1)[0], 16) == addr and line.rstrip("\n").endswith(path) for line in f)
    except (OSError, ValueError):
        return False


_probed: Capabilities | None = None
_forced: Capabilities | None = None


def capabilities() -> Capabilities:
    """This machine's capability table (probed on first use), or the one :func:`without` forces."""
    global _probed
    if _forced is not None:
        return _forced
    if _probed is None:
        _probed = probe()
    return _probed


@contextlib.contextmanager
def without(*names: str) -> Iterator[Capabilities]:
    """Run with the named capabilities switched off (``without("posix_fadvise")``), so that vm takes
    their fallbacks on a platform that has the calls. Nests; restored on exit."""
    global _forced
    fields = {c.field for c in CALLS}
    unknown = sorted(set(names) - fields)
    if unknown:
        raise ValueError(f"Expected capability names from {sorted(fields)}, got {unknown}")
    before = _forced
    _forced = dataclasses.replace(capabilities(), **dict.fromkeys(names, False))
    try:
        yield _forced
    finally:
        _forced = before
