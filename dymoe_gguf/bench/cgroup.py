"""A memory cap (and a storage read throttle) around one benchmark subprocess: child cgroups of this process's own.

The cap covers anonymous memory *and* page cache (both are charged to a memory cgroup), which is
what "a model larger than the memory it is given" means. cgroup v2 (``memory.max``) and v1
(``memory.limit_in_bytes``) are supported; the child is created under the cgroup this process is
in (``/proc/self/cgroup``), found through ``/proc/self/mountinfo``. Swap is kept out of the picture
(v2 ``memory.swap.max = 0``; v1 ``memory.swappiness = 0``) and the kernel's OOM killer stays on, so
a configuration that does not fit is killed, which the runner records as a result.

    cap = MemoryCap.create(455 * 2**20)      # raises CapUnavailable(reason) where impossible
    proc = subprocess.Popen(cmd, preexec_fn=cap.join_self)
    ...; cap.peak(), cap.oom_kills(); cap.close()

``why_unavailable()`` says why no cap can be set (not Linux, not root, no memory controller, …)
without creating anything.

A storage read throttle (``dymoe-gguf bench --read-bps``) emulates slower storage the same way: a
child blkio cgroup (v1 ``blkio.throttle.read_bps_device``) or v2 ``io.max`` ``rbps=``, set on the
whole disk that holds the model files (:func:`block_device`), joined before the subprocess starts:

    thr = ReadThrottle.create(90_000_000, [block_device(model)], share_with=cap)  # or ThrottleUnavailable
    proc = subprocess.Popen(cmd, preexec_fn=lambda: (cap.join_self(), thr.join_self()))
    ...; thr.read_bytes(); thr.close(); cap.close()
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dymoe_gguf.errors import DymoeError


class CapUnavailable(DymoeError):
    """No memory cap can be set on this machine; the message says why."""


@dataclass(frozen=True)
class CgroupMount:
    """Where this process's memory cgroup lives in the file system."""

    version: int  # 1 or 2
    path: Path  # directory of this process's own memory cgroup


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) per line of /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) >= 5 and len(b) >= 3:
                out.append((a[3], a[4], b[0], b[2]))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller -> path from /proc/self/cgroup ("" is the v2 unified hierarchy)."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def _join(mount_root: str, mount_point: str, cg_path: str) -> Path:
    rel = os.path.relpath(cg_path, mount_root) if mount_root != "/" else cg_path.lstrip("/")
    if rel.startswith(".."):  # our cgroup is outside this mount's view (cgroup namespace)
        rel = cg_path.lstrip("/")
    return Path(mount_point) / ("" if rel == "." else rel)


def _controller_mount(v1: str, v2: str, error: type[DymoeError], what: str) -> CgroupMount:
    """This process's cgroup directory for a controller: v1 ``v1`` first, then v2 ``v2``.

    A v2 mount without the controller is skipped (a hybrid system's unified mount may carry none);
    if that is all there is, the error names it."""
    if not sys.platform.startswith("linux"):
        raise error(f"{what}s are Linux-only (this is {sys.platform})")
    try:
        own, mounts = _own_cgroups(), _mountinfo()
    except OSError as exc:
        raise error(f"cannot read /proc/self/cgroup or mountinfo: {exc}") from None
    for root, point, fstype, opts in mounts:
        if fstype == "cgroup" and v1 in opts.split(",") and v1 in own:
            return CgroupMount(1, _join(root, point, own[v1]))
    disabled = None
    for root, point, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            path = _join(root, point, own[""])
            ctrls = (path / "cgroup.controllers").read_text().split() if (path / "cgroup.controllers").exists() else []
            if v2 in ctrls:
                return CgroupMount(2, path)
            disabled = path
    if disabled is not None:
        raise error(f"the {v2} controller is not enabled for {disabled} (cgroup v2)")
    raise error(f"no {what} controller is mounted (neither v1 '{v1}' nor v2 '{v2}')")


def find_mount() -> CgroupMount:
    """This process's memory cgroup directory (v1 memory controller first, then v2)."""
    return _controller_mount("memory", "memory", CapUnavailable, "memory cgroup")


def why_unavailable() -> str | None:
    """None when a cap can probably be created here, else the reason it cannot."""
    try:
        m = find_mount()
    except CapUnavailable as exc:
        return str(exc)
    if not os.access(m.path, os.W_OK):
        return f"no write access to {m.path} (run as root or with a delegated cgroup)"
    return None


class MemoryCap:
    """A child memory cgroup with a hard limit on memory including page cache."""

    def __init__(self, mount: CgroupMount, path: Path, limit: int) -> None:
        self.mount = mount
        self.path = path
        self.limit = limit
        self.version = mount.version

    @classmethod
    def create(cls, limit: int, name: str | None = None) -> MemoryCap:
        """Create the cgroup and set the limit; raises :class:`CapUnavailable` with the reason."""
        m = find_mount()
        path = m.path / (name or f"dymoe-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            if m.version == 2:
                _enable_v2(m.path, "memory", CapUnavailable)
            path.mkdir()
        except OSError as exc:
            raise CapUnavailable(f"cannot create cgroup {path}: {exc.strerror or exc}") from None
        cap = cls(m, path, int(limit))
        try:
            if m.version == 1:
                cap._write("memory.limit_in_bytes", str(cap.limit))
                cap._write("memory.swappiness", "0", required=False)
                cap._write("memory.oom_control", "0", required=False)  # OOM killer on
                cap._write("memory.move_charge_at_immigrate", "0", required=False)
            else:
                cap._write("memory.max", str(cap.limit))
                cap._write("memory.swap.max", "0", required=False)
                cap._write("memory.oom.group", "1", required=False)
            got = cap.read_limit()
            if got is None or abs(got - cap.limit) > 1 << 16:
                raise CapUnavailable(f"the limit did not take: asked {cap.limit}, cgroup reports {got}")
        except CapUnavailable:
            cap.close()
            raise
        except OSError as exc:
            cap.close()
            raise CapUnavailable(f"cannot set a memory limit on {path}: {exc.strerror or exc}") from None
        return cap

    # ------------------------------------------------------------------ files
    def _write(self, name: str, value: str, required: bool = True) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError:
            if required:
                raise

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def read_limit(self) -> int | None:
        raw = self._read("memory.limit_in_bytes" if self.version == 1 else "memory.max")
        if raw is None:
            return None
        raw = raw.strip()
        return None if raw == "max" else int(raw)

    # ------------------------------------------------------------------ processes
    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def add(self, pid: int) -> None:
        """Move ``pid`` into the cgroup."""
        self.procs_file.write_text(str(pid))

    def join_self(self) -> None:
        """Move the calling process into the cgroup (use as ``Popen(preexec_fn=cap.join_self)``)."""
        with open(self.procs_file, "w") as f:
            f.write(str(os.getpid()))

    def pids(self) -> list[int]:
        raw = self._read("cgroup.procs") or ""
        return [int(x) for x in raw.split()]

    # ------------------------------------------------------------------ measurements
    def usage(self) -> int | None:
        raw = self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current")
        return int(raw) if raw else None

    def peak(self) -> int | None:
        """Highest memory charged to the cgroup (anon + page cache) since creation."""
        raw = self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        return int(raw) if raw else None

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 where not reported)."""
        raw = self._read("memory.oom_control" if self.version == 1 else "memory.events") or ""
        for line in raw.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def failcnt(self) -> int | None:
        """v1: times the limit was hit (reclaim was forced); v2: memory.events 'max'."""
        if self.version == 1:
            raw = self._read("memory.failcnt")
            return int(raw) if raw else None
        for line in (self._read("memory.events") or "").splitlines():
            k, _, v = line.partition(" ")
            if k == "max":
                return int(v)
        return None

    # ------------------------------------------------------------------ teardown
    def close(self, timeout: float = 5.0) -> None:
        """Remove the cgroup (its page cache charge moves to the parent). Safe to repeat."""
        _remove(self.path, self.mount.path, timeout)

    def __enter__(self) -> MemoryCap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove(path: Path, parent: Path, timeout: float = 5.0) -> None:
    """rmdir a child cgroup, moving out processes that are still listed (e.g. a zombie being reaped)."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            try:
                pids = [int(x) for x in (path / "cgroup.procs").read_text().split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    (parent / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass
            time.sleep(0.05)


# ============================================================================ storage read throttle
class ThrottleUnavailable(DymoeError):
    """No storage read throttle can be set on this machine; the message says why."""


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


def fmt_rate(bps: float) -> str:
    """90e6 -> '90 MB/s', 1.5e9 -> '1.5 GB/s' (decimal units, as storage is rated)."""
    if bps >= 1e9:
        return f"{bps / 1e9:.3g} GB/s"
    return f"{bps / 1e6:.3g} MB/s"


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
    return _controller_mount("blkio", "io", ThrottleUnavailable, "I/O cgroup")


class ReadThrottle:
    """A read-bandwidth limit on whole disks for the processes of one cgroup.

    cgroup v1: a child of this process's blkio cgroup with ``blkio.throttle.read_bps_device``;
    cgroup v2: ``io.max`` ``MAJ:MIN rbps=N``. A process is in one v2 cgroup only, so on v2 the limit
    goes into the memory cap's cgroup when there is one (``share_with``) instead of a cgroup of its own.
    Reads issued by the process (read/pread, readahead, mmap page faults, MADV_WILLNEED /
    MADV_POPULATE_READ) are throttled; pages already in the page cache cost nothing.

        thr = ReadThrottle.create(90_000_000, [block_device(model)])   # raises ThrottleUnavailable
        proc = subprocess.Popen(cmd, preexec_fn=thr.join_self); ...; thr.read_bytes(); thr.close()
    """

    def __init__(self, mount: CgroupMount, path: Path, rate: int, devices: list[BlockDevice], owns: bool) -> None:
        self.mount = mount
        self.path = path
        self.rate = int(rate)
        self.devices = list(devices)
        self.owns = owns  # False: v2, the limit lives in the memory cap's cgroup (removed with it)
        self.version = mount.version

    @property
    def mechanism(self) -> str:
        return "blkio" if self.version == 1 else "io.max"

    @classmethod
    def create(cls, rate: int, devices: list[BlockDevice], *, share_with: MemoryCap | None = None,
               name: str | None = None) -> ReadThrottle:
        """Create the cgroup (or reuse ``share_with``'s on v2) and set the limit on every device."""
        if not devices:
            raise ThrottleUnavailable("no block device to throttle")
        m = find_io_mount()
        shared = m.version == 2 and share_with is not None and share_with.version == 2
        own = m.path / (name or f"dymoe-bench-read-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        path = share_with.path if shared and share_with is not None else own
        try:
            if m.version == 2:
                _enable_v2(m.path, "io", ThrottleUnavailable)
            if not shared:
                path.mkdir()
        except OSError as exc:
            raise ThrottleUnavailable(f"cannot create cgroup {path}: {exc.strerror or exc}") from None
        thr = cls(m, path, rate, devices, owns=not shared)
        try:
            for d in thr.devices:
                if thr.version == 1:
                    (path / "blkio.throttle.read_bps_device").write_text(f"{d.dev} {thr.rate}")
                else:
                    (path / "io.max").write_text(f"{d.dev} rbps={thr.rate}")
            got = thr.limits()
            bad = {d.dev: got.get(d.dev) for d in thr.devices if got.get(d.dev) != thr.rate}
            if bad:
                raise ThrottleUnavailable(f"the read limit did not take: asked {thr.rate} B/s, cgroup reports {bad}")
        except ThrottleUnavailable:
            thr.close()
            raise
        except OSError as exc:
            thr.close()
            raise ThrottleUnavailable(f"cannot set a read limit on {', '.join(d.name for d in thr.devices)} in "
                                      f"{path}: {exc.strerror or exc}") from None
        return thr

    def describe(self) -> str:
        """'storage reads throttled to 90 MB/s (blkio) on vda'."""
        return (f"storage reads throttled to {fmt_rate(self.rate)} ({self.mechanism}) on "
                + ", ".join(d.name for d in self.devices))

    # ------------------------------------------------------------------ files
    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def limits(self) -> dict[str, int | None]:
        """'MAJ:MIN' -> read bytes/s limit as the cgroup reports it (None: no limit)."""
        out: dict[str, int | None] = {}
        if self.version == 1:
            for line in self._read("blkio.throttle.read_bps_device").splitlines():
                dev, _, v = line.partition(" ")
                out[dev] = int(v) if v.strip().isdigit() else None
        else:
            for line in self._read("io.max").splitlines():
                dev, *kv = line.split()
                vals = dict(x.split("=", 1) for x in kv if "=" in x)
                out[dev] = int(vals["rbps"]) if vals.get("rbps", "max").isdigit() else None
        return out

    def read_bytes(self) -> int:
        """Bytes read from the throttled devices by the cgroup's processes (v1 io_service_bytes, v2 io.stat)."""
        devs = {d.dev for d in self.devices}
        total = 0
        if self.version == 1:
            for line in self._read("blkio.throttle.io_service_bytes").splitlines():
                f = line.split()
                if len(f) == 3 and f[0] in devs and f[1] == "Read":
                    total += int(f[2])
        else:
            for line in self._read("io.stat").splitlines():
                dev, *kv = line.split()
                if dev in devs:
                    total += int(dict(x.split("=", 1) for x in kv if "=" in x).get("rbytes", 0))
        return total

    # ------------------------------------------------------------------ processes
    def join_self(self) -> None:
        """Move the calling process into the cgroup (a no-op when sharing the memory cap's v2 cgroup)."""
        if self.owns:
            with open(self.path / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))

    def probe(self, path: str | Path, nbytes: int, timeout: float = 60.0) -> dict:
        """Read the first ``nbytes`` of ``path`` cold in a process in this cgroup; what it took.

        Returns ``bytes`` (read), ``storage_bytes`` (/proc/self/io read_bytes: what came from storage),
        ``cgroup_bytes`` (what the throttled devices counted for the cgroup), ``seconds``, ``bps``.
        """
        import subprocess

        before = self.read_bytes()
        out = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(int(nbytes))], capture_output=True,
                             text=True, timeout=timeout, preexec_fn=self.join_self)
        if out.returncode != 0:
            raise ThrottleUnavailable(f"the read probe failed: {out.stderr.strip()[-300:]}")
        got, storage, seconds = out.stdout.split()
        storage_b = int(storage) if storage != "-" else None
        return {"bytes": int(got), "storage_bytes": storage_b, "cgroup_bytes": self.read_bytes() - before,
                "seconds": float(seconds),
                "bps": (storage_b if storage_b is not None else int(got)) / max(float(seconds), 1e-9)}

    # ------------------------------------------------------------------ teardown
    def close(self, timeout: float = 5.0) -> None:
        """Remove the cgroup (v2 shared: lift the limit; the memory cap removes its cgroup). Safe to repeat."""
        if self.owns:
            _remove(self.path, self.mount.path, timeout)
            return
        for d in self.devices:
            try:
                (self.path / "io.max").write_text(f"{d.dev} rbps=max")
            except OSError:
                pass

    def __enter__(self) -> ReadThrottle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _enable_v2(parent: Path, controller: str, error: type[DymoeError]) -> None:
    """cgroup v2: ``controller`` must be enabled in the parent's subtree_control."""
    ctl = parent / "cgroup.subtree_control"
    if controller in ctl.read_text().split():
        return
    try:
        ctl.write_text(f"+{controller}")
    except OSError as exc:
        raise error(f"cannot enable the {controller} controller below {parent}: {exc.strerror or exc} "
                    "(cgroup v2 allows it only in a cgroup without processes of its own)") from None


# Run in a child process in the throttle cgroup: drop the range from the page cache, read it, time it.
_PROBE = r"""
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
def io():
    try:
        with open('/proc/self/io') as f:
            for line in f:
                if line.startswith('read_bytes:'):
                    return int(line.split()[1])
    except OSError:
        return None
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
b0, t0, off = io(), time.perf_counter(), 0
while off < n:
    got = os.pread(fd, min(1 << 20, n - off), off)
    if not got:
        break
    off += len(got)
dt = time.perf_counter() - t0
b1 = io()
os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
print(off, '-' if b0 is None or b1 is None else b1 - b0, dt)
"""
