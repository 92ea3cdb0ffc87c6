"""Where a bundle is written: what may be replaced, the lock, stale leftovers, the atomic rename.

* ``--force`` replaces only an existing *bundle* (its files and nothing else, ``dymoe.role`` in its
  ``model.gguf``); the source, a directory holding the source, ``.``, ``/``, a mount point and any
  other non-empty directory are refused before any work.
* A conversion holds ``.NAME.dymoe-lock`` (``flock``, with its pid, host and start time inside) beside the
  output for its whole run: a second conversion into the same output stops at once, and leftovers of
  a killed one (``.NAME.partial-*``, ``.NAME.old-*``) are provably dead — their lock is free — and
  removed by the next conversion into that directory, which says so.
* The bundle is written into ``.NAME.partial-TOKEN`` and renamed into place only when complete; an
  existing bundle is moved to ``.NAME.old-TOKEN`` for the instant between the two renames.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from dymoe_gguf.bundle.format import BASE_FILE, BUNDLE_ENTRY_RE, Key
from dymoe_gguf.bundle.header import HeaderError, read_header
from dymoe_gguf.errors import OutputError

log = logging.getLogger(__name__)

_WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted", errno.EFBIG: "the file is larger than this system allows",
        errno.EBUSY: "it is in use (a mount point or the working directory of a process)",
        errno.EXDEV: "it is on another file system than its parent directory"}


def write_error(out: Path, exc: OSError) -> OutputError:
    """An ``OSError`` met while writing ``out``, as one line saying what happened."""
    why = _WHY.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"Cannot write {out}: {why}; nothing was written there")


def _bundle_problem(path: Path) -> str | None:
    """None when ``path`` is a bundle directory that may be replaced; else why it is not."""
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror})"
    if not names:
        return None
    others = [n for n in names if not BUNDLE_ENTRY_RE.match(n)]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return f"it is a non-empty directory that is not a dymoe-gguf bundle (it holds {shown})"
    if BASE_FILE not in names:
        return f"it holds no {BASE_FILE}, so it is not a dymoe-gguf bundle"
    try:
        head = read_header(path / BASE_FILE, {Key.ROLE})
    except (OSError, HeaderError) as exc:
        return f"its {BASE_FILE} cannot be read as a GGUF ({exc})"
    if head.values.get(Key.ROLE) != "base":
        return f"its {BASE_FILE} is not the base file of a dymoe-gguf bundle (no {Key.ROLE} = base)"
    return None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Path, force: bool, sources: list[Path] | None = None) -> None:
    """Every check on the output location, before any work; raises :class:`OutputError`."""
    if out.is_symlink():
        raise OutputError(f"Output {out} is a symbolic link: pass the directory it points to, or another path")
    real = out.resolve()
    if real == Path(real.anchor):
        raise OutputError(f"Refusing to write a bundle to the root directory {real}: choose a new directory")
    for src in sources or []:
        for s in {src.absolute(), src.resolve()}:
            if _inside(s, out.absolute()) or _inside(s, real):
                what = "is the source" if s in (out.absolute(), real) else f"holds the source {src}"
                raise OutputError(f"Refusing to write the bundle to {out}: it {what}; choose another directory")
    if real == Path.cwd().resolve():
        raise OutputError(f"Refusing to write the bundle over the current directory ({real}): "
                          "choose a new directory such as ./model.dymoe")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"Output {out} exists and is a file, not a bundle directory: choose another path")
        if os.path.ismount(real):
            raise OutputError(f"Output {out} is a mount point: write the bundle to a new directory inside it")
        problem = _bundle_problem(real)
        if problem is not None and not force:
            raise OutputError(f"Output {out} already exists and {problem}: choose a new directory "
                              "(--force replaces only a bundle)")
        if problem is not None:
            raise OutputError(f"Refusing to replace {out}: {problem}; --force replaces only an existing "
                              "bundle: choose a new directory")
        if any(real.iterdir()) and not force:
            raise OutputError(f"Output {out} already exists: pass --force to replace it, or choose another path")
    parent = real.parent
    if not parent.is_dir():
        raise OutputError(f"Cannot write to {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        try:
            os.statvfs(parent)
            ro = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        except OSError:
            ro = False
        why = "the file system is read-only" if ro else "permission denied"
        raise OutputError(f"Cannot write {out}: {why} in {parent}")


_CHECKPOINT_RE = re.compile(r"^(config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                            r"|tokenizer\.json|tokenizer_config\.json)$")


def check_checkpoint_output(out: Path, force: bool) -> None:
    """``synth``'s output: ``--force`` replaces only a directory of checkpoint files it could have written."""
    real = out.resolve()
    if out.is_symlink() or real == Path(real.anchor) or real == Path.cwd().resolve():
        raise OutputError(f"Refusing to write a checkpoint to {out}: choose a new directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"Output {out} exists and is a file: choose another path")
    others = sorted(p.name for p in out.iterdir() if not _CHECKPOINT_RE.match(p.name))
    if others:
        raise OutputError(f"Refusing to replace {out}: it holds files a synthetic checkpoint does not "
                          f"({', '.join(others[:3])}); choose a new directory")
    if any(out.iterdir()) and not force:
        raise OutputError(f"Output {out} already exists: pass --force to replace it")


def check_space(out: Path, need_bytes: int) -> None:
    """Fail when the file system holding ``out`` has less than ``need_bytes`` free."""
    from dymoe_gguf.util import human_bytes

    usage = shutil.disk_usage(out.resolve().parent)
    if usage.total == 0:  # /proc, /sys: no storage behind them
        raise OutputError(f"Cannot write {out}: {out.resolve().parent} is not on a file system that stores files")
    free = usage.free
    if free < need_bytes:
        raise OutputError(f"Not enough disk for {out}: the bundle needs {human_bytes(need_bytes)}, "
                          f"{human_bytes(free)} free on that filesystem")


# --------------------------------------------------------------------------- lock and stale leftovers

_LOCK_SUFFIX = ".dymoe-lock"
_OWNER_MARK = "dymoe-gguf convert"


def _lock_path(parent: Path, name: str) -> Path:
    return parent / f".{name}{_LOCK_SUFFIX}"


def _owner_text() -> str:
    p = psutil.Process()
    return f"pid {p.pid}\nhost {socket.gethostname()}\nstarted {p.create_time():.3f}\n{_OWNER_MARK}\n"


def _owner_alive(text: str) -> bool:
    """Whether the process a lock file names may still run (same host, same pid and start time)."""
    info = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    if info.get("host") != socket.gethostname():
        return True  # another machine (shared storage): cannot tell
    try:
        proc = psutil.Process(int(info.get("pid", "0")))
        return abs(proc.create_time() - float(info.get("started", "0"))) < 0.01
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.Error:
        return True


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if needed), or None if held elsewhere."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # no flock on this file system: proceed unlocked
            os.close(fd)
            return -1
        try:
            same = os.fstat(fd).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:  # not unlinked by its previous holder between our open and flock
            return fd
        os.close(fd)


class OutputLock:
    """The per-output lock ``.NAME.dymoe-lock``; a second conversion into NAME is refused while it is held."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = _lock_path(out.resolve().parent, out.name)
        try:
            fd = _try_lock(self.path)
        except OSError as exc:
            raise write_error(out, exc) from None
        if fd is None:
            try:
                who = self.path.read_text().split("\n", 1)[0]
            except OSError:
                who = "unknown pid"
            raise OutputError(f"Another conversion into {out} is running ({who}); wait for it or choose "
                              "another output")
        self.fd = fd
        if fd >= 0:
            os.ftruncate(fd, 0)
            os.write(fd, _owner_text().encode())

    def release(self) -> None:
        """Remove the lock file, then drop the lock."""
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
        self.fd = -2


def clean_stale(parent: Path) -> list[str]:
    """Remove leftovers of killed conversions in ``parent`` whose lock is free and whose owner is dead.

    Returns one line per action. A ``.NAME.old-*`` whose bundle was never replaced (killed between
    the two renames) is moved back to NAME.
    """
    done: list[str] = []
    try:
        locks = sorted(parent.glob(f".*{_LOCK_SUFFIX}"))
    except OSError:
        return done
    for lock in locks:
        name = lock.name[1:-len(_LOCK_SUFFIX)]
        leftovers = sorted(parent.glob(f".{name}.partial-*")) + sorted(parent.glob(f".{name}.old-*"))
        try:
            fd = _try_lock(lock)
        except OSError:
            continue
        if fd is None or fd < 0:
            continue  # a live conversion holds it (or no locking here: cannot prove anything)
        try:
            text = lock.read_text()
            if _OWNER_MARK not in text.splitlines() or _owner_alive(text):
                continue  # not provably ours, or its process still runs
            pid = text.split("\n", 1)[0]
            for p in leftovers:
                if ".old-" in p.name and not (parent / name).exists() and _bundle_problem(p) is None:
                    p.rename(parent / name)
                    done.append(f"restored {parent / name} from {p.name}, left by a killed conversion ({pid})")
                else:
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(f"removed {p}, left by a killed conversion ({pid})")
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return done


# --------------------------------------------------------------------------- the atomic directory

@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``out``; rename it to ``out`` only on success.

    On any error or interruption (Ctrl-C, SIGTERM) the temporary directory is removed; a SIGKILL
    leaves only ``.NAME.partial-*`` (never a valid bundle), which :func:`clean_stale` removes later.
    Errors of the file system (full, read-only, permission) become one-line :class:`OutputError`.
    """
    token = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{token}"
    try:
        tmp.mkdir(parents=False)
    except OSError as exc:
        raise write_error(out, exc) from None
    interrupted: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: object) -> None:
        interrupted.append(signum)  # remembered: an exception raised in a finaliser can be swallowed
        raise KeyboardInterrupt

    try:
        for sig in old:
            signal.signal(sig, on_signal)
    except ValueError:  # not the main thread
        old = {}
    try:
        try:
            yield tmp
        except OSError as exc:
            raise write_error(out, exc) from None
        if interrupted:  # a signal arrived but its KeyboardInterrupt got lost: never publish the bundle
            raise KeyboardInterrupt
        _publish(tmp, out, force, token)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path, force: bool, token: str) -> None:
    try:
        if out.exists() and any(out.iterdir()):
            if not force:
                raise OutputError(f"Output {out} appeared while converting; not replacing it without --force")
            problem = _bundle_problem(out)
            if problem is not None:
                raise OutputError(f"Refusing to replace {out}: {problem} (it changed while converting)")
            trash = out.parent / f".{out.name}.old-{token}"
            out.rename(trash)
            try:
                tmp.rename(out)
            except OSError:
                trash.rename(out)  # put the old bundle back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)  # over an empty directory, or where nothing was
    except OSError as exc:
        raise write_error(out, exc) from None
