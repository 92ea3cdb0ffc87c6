"""``inspect --verify``: every tensor of every bundle file against the checksum stored when it was written.

``convert`` stores, in each file's ``dymoe.checksums``, the xxh3 (64-bit) of each tensor's bytes in
tensor-table order. Verifying reads the whole bundle once (sequentially, 16 MiB at a time); hashing
runs at about 15 GB/s here, so storage speed sets the time. The first tensor whose bytes differ is
named. Plain ``inspect`` does not read tensor data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from dymoe_gguf.bundle.format import BASE_FILE, CHECKSUM_ALGO, Key
from dymoe_gguf.bundle.header import HeaderError, read_header
from dymoe_gguf.bundle.index import BundleIndex
from dymoe_gguf.errors import BundleError
from dymoe_gguf.util import read_error

_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class VerifyResult:
    """What ``--verify`` checked."""

    files: int
    tensors: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return {"files": self.files, "tensors": self.tensors, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "ok": True}


def _stored(path: Path, n: int) -> np.ndarray:
    try:
        head = read_header(path, {Key.CHECKSUM_ALGO, Key.CHECKSUMS})
    except OSError as exc:
        raise BundleError(read_error(path, exc)) from None
    except HeaderError as exc:
        raise BundleError(f"Corrupt {path.name}: {exc}") from None
    algo, sums = head.values.get(Key.CHECKSUM_ALGO), head.values.get(Key.CHECKSUMS)
    if algo is None or sums is None:
        raise BundleError(f"{path.name} holds no checksums (converted by an older dymoe-gguf): re-convert the "
                          "bundle to be able to verify it")
    if algo != CHECKSUM_ALGO:
        raise BundleError(f"{path.name}: checksum algorithm {algo!r} is not supported (expected {CHECKSUM_ALGO})")
    if not isinstance(sums, np.ndarray) or sums.shape != (n,):
        raise BundleError(f"Corrupt {path.name}: {Key.CHECKSUMS} does not hold one checksum per tensor")
    return sums


def verify_bundle(index: BundleIndex) -> VerifyResult:
    """Hash every tensor of every file; raise :class:`BundleError` naming the first one that differs."""
    t0 = time.perf_counter()
    total = count = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    per_file = index.file_tensors()
    for path, tensors in per_file.items():
        sums = _stored(path, len(tensors))
        try:
            f = open(path, "rb", buffering=0)  # closed in finally
        except OSError as exc:
            raise BundleError(read_error(path, exc)) from None
        try:
            for (name, offset, nbytes), want in zip(tensors, sums):
                h = xxhash.xxh3_64()
                done = 0
                f.seek(offset)
                while done < nbytes:
                    n = f.readinto(view[:min(_CHUNK, nbytes - done)])
                    if not n:
                        raise BundleError(f"{path.name} is truncated: {name} ends past the end of the file")
                    h.update(view[:n])
                    done += n
                if h.intdigest() != int(want):
                    where = "" if path.name == BASE_FILE else f" ({_describe(name)})"
                    raise BundleError(f"{path.name} is corrupt: tensor {name}{where} differs from the checksum "
                                      "stored when it was written; re-convert the bundle or restore the file")
                total += nbytes
                count += 1
        except OSError as exc:
            raise BundleError(read_error(path, exc)) from None
        finally:
            f.close()
    return VerifyResult(len(per_file), count, total, time.perf_counter() - t0)


def _describe(name: str) -> str:
    parts = name.split(".")
    return f"layer {parts[1]}, {parts[2].removeprefix('ffn_').removesuffix('_exps')} matrix, expert {parts[3]}"
