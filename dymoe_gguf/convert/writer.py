"""Streaming GGUF output and the atomic bundle directory.

gguf's ``GGUFWriter`` writes the header, metadata and tensor table (it computes every offset from
the sizes in the plan); tensor data is then appended piece by piece — one expert at a time — with
the same alignment padding ``GGUFWriter.write_tensor_data`` would add, so memory stays bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from dymoe_gguf.convert.plan import FilePlan
from dymoe_gguf.errors import OutputError


class GGUFStream:
    """One output GGUF whose tensor table is fixed up front and whose data arrives in order."""

    def __init__(self, path: Path, arch: str, plan: FilePlan, alignment: int,
                 metadata: Callable[[gguf.GGUFWriter], None]) -> None:
        self.path = path
        self.plan = plan
        self._w = gguf.GGUFWriter(path, arch)
        self._w.add_custom_alignment(alignment)
        metadata(self._w)
        for t in plan.tensors:
            self._w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        self._w.write_header_to_file(path)
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()
        assert self._w.fout is not None
        self._f = self._w.fout[0]
        self._next = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far

    def write(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor (a whole tensor or the next piece of it)."""
        t = self.plan.tensors[self._next]
        if self._written == 0:
            self._w.write_padding(self._f, self._f.tell())
        raw = data.view(np.uint8).reshape(-1)
        if self._written + raw.nbytes > t.nbytes:
            raise AssertionError(f"Expected {t.nbytes} bytes for {t.name}, got more")
        raw.tofile(self._f)
        self._written += raw.nbytes
        if self._written == t.nbytes:
            self._w.write_padding(self._f, t.nbytes)
            self._next += 1
            self._written = 0

    def close(self) -> None:
        """Flush, fsync and close; checks that every planned tensor was written."""
        if self._next != len(self.plan.tensors):
            raise AssertionError(f"{self.path.name}: wrote {self._next} of {len(self.plan.tensors)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._w.close()

    def abort(self) -> None:
        self._w.close()


def check_output(out: Path, force: bool, need_bytes: int) -> None:
    """Every check on the output location, before any heavy work."""
    if out.exists() and not force:
        raise OutputError(f"Output {out} already exists: pass --force to replace it, or choose another path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"Output {out} exists and is not a directory")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"Cannot write to {out}: parent directory {parent} does not exist")
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        from dymoe_gguf.util import human_bytes

        raise OutputError(f"Not enough disk for {out}: the bundle needs {human_bytes(need_bytes)}, "
                          f"{human_bytes(free)} free on that filesystem")


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``out``; rename it to ``out`` only on success.

    On any error or interruption (Ctrl-C, SIGTERM) the temporary directory is removed; a SIGKILL
    leaves only ``.NAME.partial-*``, which never loads as a bundle.
    """
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=False)
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
        yield tmp
        if interrupted:  # a signal arrived but its KeyboardInterrupt got lost: never publish the bundle
            raise KeyboardInterrupt
        if out.exists():
            if not force:
                raise OutputError(f"Output {out} appeared while converting; not replacing it without --force")
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
