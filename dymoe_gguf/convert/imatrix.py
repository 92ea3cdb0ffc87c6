"""Importance matrices in llama.cpp's GGUF imatrix format (``llama-imatrix`` output).

For each weight ``W`` the file holds ``W.in_sum2`` (float32, ggml ne ``[n_in, n_mat]``: the sum of
squared activations entering each column, per expert for expert tensors) and ``W.counts``
(ne ``[1, n_mat]``: how many activation rows were summed). Importance = in_sum2 / counts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np

from dymoe_gguf.convert.plan import NEEDS_IMATRIX, ConvertPlan
from dymoe_gguf.errors import SourceError
from dymoe_gguf.util import atomic_file, read_error


def load_imatrix(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """name -> importance array ``[n_mat, n_in]``, and the file's sha256."""
    if not path.exists():
        raise SourceError(f"Importance matrix {path} does not exist")
    if not path.is_file():
        raise SourceError(f"Importance matrix {path} is not a file (expected llama.cpp's GGUF imatrix format)")
    try:
        with open(path, "rb"):
            pass
        reader = gguf.GGUFReader(path, "r")
    except OSError as exc:
        raise SourceError(read_error(path, exc)) from None
    except Exception as exc:
        raise SourceError(f"Corrupt imatrix {path.name} (expected llama.cpp's GGUF imatrix format): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    bad = next((t for t in reader.tensors if t.tensor_type != gguf.GGMLQuantizationType.F32), None)
    if bad is not None:
        raise SourceError(f"Imatrix {path.name} is not an importance matrix: tensor {bad.name} is "
                          f"{bad.tensor_type.name}, expected F32 (a model GGUF?)")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out: dict[str, np.ndarray] = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise SourceError(f"Corrupt imatrix {path.name}: {base}.counts is missing")
        sums2 = sums.reshape(-1, sums.shape[-1])
        c = counts.reshape(-1)
        if c.shape[0] != sums2.shape[0]:
            raise SourceError(f"Corrupt imatrix {path.name}: {base} has {sums2.shape[0]} rows, {c.shape[0]} counts")
        with np.errstate(divide="ignore", invalid="ignore"):
            imp = np.where(c[:, None] > 0, sums2 / np.maximum(c[:, None], 1), 1.0)
        out[base] = imp.astype(np.float32)
    if not out:
        raise SourceError(f"Imatrix {path.name} holds no *.in_sum2 tensors")
    return out, hashlib.sha256(path.read_bytes()).hexdigest()


def check_imatrix(imat: dict[str, np.ndarray], path: Path, plan: ConvertPlan) -> None:
    """The importance matrix fits the planned model, and covers every tensor whose type needs one."""
    tensors = {t.name: t for t in plan.base.tensors}
    if imat:
        matched = [n for n in imat if n in tensors]
        if not matched:
            example = next(iter(sorted(imat)))
            raise SourceError(f"Importance matrix {path.name} is for another model: none of its {len(imat)} "
                              f"tensors (e.g. {example}) is in this one")
        for name in matched:
            t, imp = tensors[name], imat[name]
            n_mat = t.shape[0] if t.source.is_expert else 1
            if imp.shape[-1] != t.shape[-1] or imp.shape[0] not in (1, n_mat):
                raise SourceError(f"Importance matrix {path.name} does not fit this model (is it from another "
                                  f"one?): {name} takes {n_mat} x {t.shape[-1]} inputs, the imatrix has "
                                  f"{imp.shape[0]} x {imp.shape[-1]}")
    for f in plan.files:
        for t in f.tensors:
            if t.qtype in NEEDS_IMATRIX and t.source.name not in imat:
                how = (f"--imatrix {path.name} has no entry for it" if imat
                       else "pass --imatrix FILE (llama-imatrix's output) covering it")
                raise SourceError(f"{t.qtype.name} needs an importance matrix for {t.source.name}: {how}, "
                                  "or choose another type")


def write_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                  dataset: str, chunk_count: int, chunk_size: int) -> None:
    """Write ``name -> in_sum2 [n_mat, n_in]`` and ``counts [n_mat]`` in llama.cpp's format."""
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, "imatrix")
        # llama-imatrix writes no architecture; GGUFWriter always adds one, harmless for readers.
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", chunk_count)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(sums):
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums[name], dtype=np.float32))
            w.add_tensor(f"{name}.counts", np.asarray(counts[name], dtype=np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
