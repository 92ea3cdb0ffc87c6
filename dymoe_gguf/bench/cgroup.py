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
without creating anything; ``cap_status()`` is the one answer ``doctor`` and ``bench`` both give.
The storage read throttle (:mod:`dymoe_gguf.bench.throttle`) finds its cgroup through the same
lookup (:func:`controller_mount`).
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


def controller_mount(v1: str, v2: str, error: type[DymoeError], what: str) -> CgroupMount:
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
    return controller_mount("memory", "memory", CapUnavailable, "memory cgroup")


def why_unavailable() -> str | None:
    """None when a cap can probably be created here, else the reason it cannot."""
    try:
        m = find_mount()
    except CapUnavailable as exc:
        return str(exc)
    if not os.access(m.path, os.W_OK):
        return f"no write access to {m.path} (run as root or with a delegated cgroup)"
    return None


def cap_status() -> dict[str, object]:
    """Whether a memory cap can be set here and how: ``available``, ``how`` (mechanism and cgroup, or
    the reason there is none). ``doctor`` reports it; ``bench`` caps through the same lookup."""
    why = why_unavailable()
    if why is not None:
        return {"available": False, "how": why}
    m = find_mount()
    knob = "memory.limit_in_bytes" if m.version == 1 else "memory.max"
    return {"available": True, "how": f"cgroup v{m.version} {knob} below {m.path}"}


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
                enable_v2(m.path, "memory", CapUnavailable)
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
        remove_cgroup(self.path, self.mount.path, timeout)

    def __enter__(self) -> MemoryCap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_cgroup(path: Path, parent: Path, timeout: float = 5.0) -> None:
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


def enable_v2(parent: Path, controller: str, error: type[DymoeError]) -> None:
    """cgroup v2: ``controller`` must be enabled in the parent's subtree_control."""
    ctl = parent / "cgroup.subtree_control"
    if controller in ctl.read_text().split():
        return
    try:
        ctl.write_text(f"+{controller}")
    except OSError as exc:
        raise error(f"cannot enable the {controller} controller below {parent}: {exc.strerror or exc} "
                    "(cgroup v2 allows it only in a cgroup without processes of its own)") from None
