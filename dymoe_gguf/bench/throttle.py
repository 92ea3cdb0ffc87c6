"""Emulated slow storage: a read-bandwidth and read-IOPS limit on one benchmark subprocess.

``dymoe-gguf bench --read-bps 90MB --read-iops 2000`` (or ``--storage sd``) puts every configuration's
process in a cgroup whose reads from the disk holding the model files (:func:`block_device`) are
limited by the kernel's block throttle: cgroup v1 ``blkio.throttle.read_bps_device`` /
``read_iops_device``, or v2 ``io.max`` ``rbps=`` / ``riops=``. Bandwidth alone lets a configuration that
reads in 4 KiB page faults off lightly; an IOPS limit makes each small read cost what it costs on an SD
card (≈0.5 ms at 2k IOPS).

    thr = ReadThrottle.create([block_device(model)], bps=90_000_000, iops=2000, share_with=cap)
    proc = subprocess.Popen(cmd, preexec_fn=lambda: (cap.join_self(), thr.join_self()))
    ...; thr.read_bytes(); thr.close(); cap.close()
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from dymoe_gguf.bench.cgroup import CgroupMount, MemoryCap, controller_mount, enable_v2, remove_cgroup
from dymoe_gguf.errors import DymoeError


class ThrottleUnavailable(DymoeError):
    """No storage read throttle can be set on this machine; the message says why."""


@dataclass(frozen=True)
class StorageProfile:
    """Named storage to emulate (``--storage``): sequential read bandwidth and random-read IOPS."""

    bps: int
    iops: int
    desc: str


# Assumptions, stated in the report: an A2-class microSD card in a Raspberry Pi 5 (≈90 MB/s sequential,
# ≈2k random 4 KiB reads/s: 0.5 ms each), and an NVMe drive on the Pi 5's PCIe 2.0 x1 link (≈800 MB/s,
# tens of thousands of IOPS; its 4 KiB reads at queue depth 1 take ≈0.1 ms).
STORAGE: dict[str, StorageProfile] = {
    "sd": StorageProfile(90_000_000, 2_000, "Raspberry Pi 5 microSD card (~90 MB/s, ~2k IOPS)"),
    "nvme": StorageProfile(800_000_000, 50_000, "Raspberry Pi 5 NVMe, PCIe 2.0 x1 (~800 MB/s, ~50k IOPS)"),
}


@dataclass(frozen=True, order=True)
class BlockDevice:
    """The whole disk (not a partition) that receives a file's reads."""

    major: int
    minor: int
    name: str

    @property
    def dev(self) -> str:
        return f"{self.major}:{self.minor}"


def parse_rate(text: str | int) -> int:
    """'90MB', '90MB/s', '800 MiB', 90000000 -> bytes per second (at least 1 MB/s)."""
    from dymoe_gguf.util import parse_size

    s = text if isinstance(text, int) else str(text).strip()
    if isinstance(s, str) and s.lower().endswith("/s"):
        s = s[:-2]
    try:
        rate = parse_size(s)
    except DymoeError:
        raise DymoeError(f"Expected a read rate such as 90MB or 800MB (bytes per second), got {text!r}") from None
    if rate < 1_000_000:
        raise DymoeError(f"A read rate of {text!r} is {rate} bytes/s, below the 1 MB/s minimum: give a unit, "
                         "e.g. 90MB for 90 MB/s")
    return rate


def parse_iops(text: str | int) -> int:
    """'2000', '2k', '50K', 2000 -> read operations per second (at least 10)."""
    s = str(text).strip().lower()
    mult = 1000 if s.endswith("k") else 1
    try:
        v = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise DymoeError(f"Expected read operations per second such as 2000 or 2k, got {text!r}") from None
    if not v >= 10 or v != int(v):
        raise DymoeError(f"Expected a whole number of read operations per second of at least 10, got {text!r}")
    return int(v)


def fmt_rate(bps: float) -> str:
    """90e6 -> '90 MB/s', 1.5e9 -> '1.5 GB/s' (decimal units, as storage is rated)."""
    if bps >= 1e9:
        return f"{bps / 1e9:.3g} GB/s"
    return f"{bps / 1e6:.3g} MB/s"


def fmt_limits(bps: int | None, iops: int | None) -> str:
    """'90 MB/s, 2000 IOPS' (either part may be absent)."""
    return ", ".join(x for x in (fmt_rate(bps) if bps else None, f"{iops} IOPS" if iops else None) if x)


def _mount_source(dev: str) -> tuple[str, str] | None:
    """(fs type, source) of the mount whose st_dev is ``dev`` ('MAJ:MIN'), from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                a, b = left.split(), right.split()
                if len(a) >= 3 and len(b) >= 2 and a[2] == dev:
                    return b[0], b[1]
    except OSError:
        pass
    return None


def block_device(path: str | Path) -> BlockDevice:
    """The disk holding ``path``: st_dev, or the mount's source device (btrfs), a partition's parent disk."""
    import stat

    if not sys.platform.startswith("linux"):
        raise ThrottleUnavailable(f"storage read throttling is Linux-only (this is {sys.platform})")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ThrottleUnavailable(f"cannot stat {path}: {exc.strerror or exc}") from None
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sysdev = Path("/sys/dev/block") / dev
    if not sysdev.exists():  # e.g. btrfs reports an anonymous st_dev; its mount source names the device
        src = _mount_source(dev)
        rdev = None
        if src and src[1].startswith("/dev/"):
            try:
                s2 = os.stat(src[1])
                rdev = s2.st_rdev if stat.S_ISBLK(s2.st_mode) else None
            except OSError:
                rdev = None
        if rdev is None:
            what = f"a {src[0]} file system from {src[1]}" if src else f"device {dev}"
            raise ThrottleUnavailable(f"{path} is not on a block device ({what}): there is no disk to throttle")
        dev = f"{os.major(rdev)}:{os.minor(rdev)}"
        sysdev = Path("/sys/dev/block") / dev
    try:
        real = sysdev.resolve(strict=True)
        if (real / "partition").is_file():  # throttling applies to whole disks: a partition's I/O is its disk's
            real = real.parent
        major, minor = (int(x) for x in (real / "dev").read_text().split(":"))
    except (OSError, ValueError) as exc:
        raise ThrottleUnavailable(f"cannot find the disk of {path} in /sys/dev/block ({dev}): {exc}") from None
    return BlockDevice(major, minor, real.name)


def find_io_mount() -> CgroupMount:
    """This process's blkio (v1) or io (v2) cgroup directory, the parent of a read throttle."""
    return controller_mount("blkio", "io", ThrottleUnavailable, "I/O cgroup")


class ReadThrottle:
    """A read-bandwidth and/or read-IOPS limit on whole disks for the processes of one cgroup.

    cgroup v1: a child of this process's blkio cgroup with ``blkio.throttle.read_bps_device`` /
    ``read_iops_device``; cgroup v2: ``io.max`` ``MAJ:MIN rbps=N riops=M``. A process is in one v2 cgroup
    only, so on v2 the limit goes into the memory cap's cgroup when there is one (``share_with``).
    Reads issued by the process (read/pread, readahead, mmap page faults, MADV_WILLNEED /
    MADV_POPULATE_READ) are throttled; pages already in the page cache cost nothing.
    """

    def __init__(self, mount: CgroupMount, path: Path, devices: list[BlockDevice], owns: bool, *,
                 bps: int | None = None, iops: int | None = None) -> None:
        self.mount = mount
        self.path = path
        self.bps = int(bps) if bps else None
        self.iops = int(iops) if iops else None
        self.devices = list(devices)
        self.owns = owns  # False: v2, the limit lives in the memory cap's cgroup (removed with it)
        self.version = mount.version

    @property
    def mechanism(self) -> str:
        return "blkio" if self.version == 1 else "io.max"

    @classmethod
    def create(cls, devices: list[BlockDevice], *, bps: int | None = None, iops: int | None = None,
               share_with: MemoryCap | None = None, name: str | None = None) -> ReadThrottle:
        """Create the cgroup (or reuse ``share_with``'s on v2) and set the limits on every device."""
        if not devices:
            raise ThrottleUnavailable("no block device to throttle")
        if not bps and not iops:
            raise ThrottleUnavailable("no read limit given (bytes/s or IOPS)")
        m = find_io_mount()
        shared = m.version == 2 and share_with is not None and share_with.version == 2
        own = m.path / (name or f"dymoe-bench-read-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        path = share_with.path if shared and share_with is not None else own
        try:
            if m.version == 2:
                enable_v2(m.path, "io", ThrottleUnavailable)
            if not shared:
                path.mkdir()
        except OSError as exc:
            raise ThrottleUnavailable(f"cannot create cgroup {path}: {exc.strerror or exc}") from None
        thr = cls(m, path, devices, owns=not shared, bps=bps, iops=iops)
        try:
            for d in thr.devices:
                if thr.version == 1:
                    for knob, v in (("read_bps_device", thr.bps), ("read_iops_device", thr.iops)):
                        if v:
                            (path / f"blkio.throttle.{knob}").write_text(f"{d.dev} {v}")
                else:
                    kv = " ".join(f"{k}={v}" for k, v in (("rbps", thr.bps), ("riops", thr.iops)) if v)
                    (path / "io.max").write_text(f"{d.dev} {kv}")
            got = thr.limits()
            bad = {d.dev: got.get(d.dev) for d in thr.devices if got.get(d.dev) != (thr.bps, thr.iops)}
            if bad:
                raise ThrottleUnavailable(f"the read limit did not take: asked {(thr.bps, thr.iops)} (bytes/s, IOPS), "
                                          f"cgroup reports {bad}")
        except ThrottleUnavailable:
            thr.close()
            raise
        except OSError as exc:
            thr.close()
            raise ThrottleUnavailable(f"cannot set a read limit on {', '.join(d.name for d in thr.devices)} in "
                                      f"{path}: {exc.strerror or exc}") from None
        return thr

    def describe(self) -> str:
        """'storage reads throttled to 90 MB/s, 2000 IOPS (blkio) on vda'."""
        return (f"storage reads throttled to {fmt_limits(self.bps, self.iops)} ({self.mechanism}) on "
                + ", ".join(d.name for d in self.devices))

    # ------------------------------------------------------------------ files
    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def limits(self) -> dict[str, tuple[int | None, int | None]]:
        """'MAJ:MIN' -> (read bytes/s, read IOPS) limits as the cgroup reports them (None: no limit)."""
        out: dict[str, list[int | None]] = {}
        if self.version == 1:
            for i, knob in enumerate(("read_bps_device", "read_iops_device")):
                for line in self._read(f"blkio.throttle.{knob}").splitlines():
                    dev, _, v = line.partition(" ")
                    out.setdefault(dev, [None, None])[i] = int(v) if v.strip().isdigit() else None
        else:
            for line in self._read("io.max").splitlines():
                dev, *kv = line.split()
                vals = dict(x.split("=", 1) for x in kv if "=" in x)
                out[dev] = [int(vals[k]) if vals.get(k, "max").isdigit() else None for k in ("rbps", "riops")]
        return {dev: (v[0], v[1]) for dev, v in out.items()}

    def _stat(self, v1_file: str, v2_key: str, v1_op: str = "Read") -> int:
        devs = {d.dev for d in self.devices}
        total = 0
        if self.version == 1:
            for line in self._read(v1_file).splitlines():
                f = line.split()
                if len(f) == 3 and f[0] in devs and f[1] == v1_op:
                    total += int(f[2])
        else:
            for line in self._read("io.stat").splitlines():
                dev, *kv = line.split()
                if dev in devs:
                    total += int(dict(x.split("=", 1) for x in kv if "=" in x).get(v2_key, 0))
        return total

    def read_bytes(self) -> int:
        """Bytes read from the throttled devices by the cgroup's processes (v1 io_service_bytes, v2 io.stat)."""
        return self._stat("blkio.throttle.io_service_bytes", "rbytes")

    def read_ios(self) -> int:
        """Read operations on the throttled devices by the cgroup's processes (v1 io_serviced, v2 rios)."""
        return self._stat("blkio.throttle.io_serviced", "rios")

    # ------------------------------------------------------------------ processes
    def join_self(self) -> None:
        """Move the calling process into the cgroup (a no-op when sharing the memory cap's v2 cgroup)."""
        if self.owns:
            with open(self.path / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))

    def probe(self, path: str | Path, nbytes: int, *, random_4k: bool = False, timeout: float = 60.0) -> dict:
        """Read ``nbytes`` of ``path`` cold in a process in this cgroup, sequentially in 4 MiB ``pread``s
        or (``random_4k``) as single-page reads at random page offsets; what it took.

        Returns ``bytes``, ``storage_bytes`` (/proc/self/io read_bytes), ``cgroup_bytes`` and
        ``cgroup_ios`` (what the throttled devices counted for the cgroup), ``seconds``, ``bps``, ``iops``.
        """
        import json
        import subprocess

        b0, i0 = self.read_bytes(), self.read_ios()
        out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(int(nbytes)), "rand" if random_4k else "seq"],
                             capture_output=True, text=True, timeout=timeout, preexec_fn=self.join_self)
        if out.returncode != 0:
            raise ThrottleUnavailable(f"the read probe failed: {out.stderr.strip()[-300:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res.pop("ok", None)
        return res | {"cgroup_bytes": self.read_bytes() - b0, "cgroup_ios": self.read_ios() - i0}

    # ------------------------------------------------------------------ teardown
    def close(self, timeout: float = 5.0) -> None:
        """Remove the cgroup (v2 shared: lift the limit; the memory cap removes its cgroup). Safe to repeat."""
        if self.owns:
            remove_cgroup(self.path, self.mount.path, timeout)
            return
        for d in self.devices:
            try:
                (self.path / "io.max").write_text(f"{d.dev} rbps=max riops=max")
            except OSError:
                pass

    def __enter__(self) -> ReadThrottle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Run in a child process (in a throttle / cap cgroup): drop the file from the page cache, read it, time it.
# argv: path, bytes, "seq" (4 MiB preads from the start) | "rand" (4 KiB preads at distinct random pages,
# POSIX_FADV_RANDOM: no read-ahead, one I/O each); later arguments are ignored. Prints one JSON line:
# bytes read, storage_bytes (/proc/self/io; None where unavailable), seconds, reads, bps, iops.
PROBE = r"""
import json, os, random, sys, time
path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def io():
    try:
        with open('/proc/self/io') as f:
            for line in f:
                if line.startswith('read_bytes:'):
                    return int(line.split()[1])
    except OSError:
        return None
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
advise = getattr(os, 'posix_fadvise', lambda *a: None)  # macOS has none: the read is then not cold
advise(fd, 0, 0, getattr(os, 'POSIX_FADV_DONTNEED', 4))
if mode == 'rand':
    advise(fd, 0, 0, getattr(os, 'POSIX_FADV_RANDOM', 1))
    pages = random.Random(0).sample(range(size // 4096), min(size // 4096, max(1, n // 4096)))
    offs = [(p * 4096, 4096) for p in pages]
else:  # sequential, with the kernel's read-ahead on (FADV_SEQUENTIAL doubles its window)
    advise(fd, 0, 0, getattr(os, 'POSIX_FADV_SEQUENTIAL', 2))
    offs = [(o, min(4 << 20, n - o)) for o in range(0, min(n, size), 4 << 20)]
b0, t0, got = io(), time.perf_counter(), 0
for off, ln in offs:
    got += len(os.pread(fd, ln, off))
dt = max(time.perf_counter() - t0, 1e-9)
b1 = io()
advise(fd, 0, 0, getattr(os, 'POSIX_FADV_DONTNEED', 4))
storage = None if b0 is None or b1 is None else b1 - b0
print(json.dumps({"ok": True, "bytes": got, "storage_bytes": storage, "seconds": dt, "reads": len(offs),
                  "bps": (got if storage is None else storage) / dt, "iops": len(offs) / dt}))
"""
