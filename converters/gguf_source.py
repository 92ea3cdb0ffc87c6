"""An existing GGUF as a conversion source: experts are re-quantized into tiers.

Any type gguf-py can dequantize (``gguf.quants``: F32/F16/BF16, Q4_0…Q8_0, K-quants, IQ types)
is accepted, so the files MoE users download (``Q4_K_M``, ``Q5_K_M``, ``Q6_K``, ``Q8_0``) are sources.
An expert is dequantized to float32 for every tier whose type differs from the source's; the
source's own bytes are offered too (``raw_expert``), so a tier of the same type is a byte-identical
copy rather than a second rounding. Non-expert tensors pass through with their type unless an
override asks otherwise. A split GGUF (``-00001-of-00003.gguf``) is read across its parts.
Everything is read through ``gguf.GGUFReader`` (a read-only memmap), one expert at a time.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import gguf
import numpy as np

from dymoe_gguf.bundle.format import BASE_NAME_RE
from dymoe_gguf.converters import arch as arches
from dymoe_gguf.converters.arch._common import HParams
from dymoe_gguf.converters.source import Source, SourceTensor
from dymoe_gguf.errors import SourceError, UnsupportedModelError
from dymoe_gguf.util import read_error

QT = gguf.GGMLQuantizationType
_FLOAT = (QT.F32, QT.F16)
# written by the converter itself (alignment, file type, quantization version, dymoe keys) or meaningless
# in one file (split.*)
_SKIP_KEYS = ("GGUF.", "general.alignment", "general.file_type", "general.quantization_version", "dymoe.", "split.")
_SPLIT_RE = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.gguf$")


def open_reader(path: Path) -> gguf.GGUFReader:
    """GGUFReader with corrupt or truncated files turned into a SourceError."""
    try:
        with open(path, "rb"):
            pass
        return gguf.GGUFReader(path, "r")
    except OSError as exc:
        raise SourceError(read_error(path, exc)) from None
    except Exception as exc:  # GGUFReader raises ValueError/struct.error/IndexError on bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"Corrupt or truncated GGUF {path.name}: {msg}") from None


def _field(reader: gguf.GGUFReader, key: str) -> object | None:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def dequantizable(qtype: QT) -> bool:
    """Whether gguf-py can turn ``qtype`` data back into floats."""
    return qtype in _FLOAT or qtype in gguf.quants._type_traits  # gguf's own dispatch table


def _to_f32(data: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return np.array(data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)


def _parts(path: Path, reader: gguf.GGUFReader) -> tuple[list[Path], list[gguf.GGUFReader]]:
    """The paths and readers of all parts of a split GGUF, first part first (``path`` is one of them)."""
    count = _field(reader, "split.count")
    if not count or int(count) <= 1:  # type: ignore[arg-type]
        return [path], [reader]
    m = _SPLIT_RE.match(path.name)
    if not m:
        raise SourceError(f"{path.name} is part of a split GGUF ({count} parts) but is not named "
                          "NAME-0000N-of-0000M.gguf: pass the first part with its original name")
    names = [path.parent / f"{m.group(1)}-{i:05d}-of-{int(count):05d}.gguf" for i in range(1, int(count) + 1)]
    missing = [p.name for p in names if not p.is_file()]
    if missing:
        raise SourceError(f"Split GGUF {path.name}: part {missing[0]} is missing from {path.parent}")
    return names, [reader if p == path else open_reader(p) for p in names]


def open_gguf(path: Path, *, kind: str = "gguf", ident: str | None = None) -> Source:
    """Read a GGUF MoE model (or all parts of a split one) of a supported architecture."""
    paths, readers = _parts(path, open_reader(path))
    reader = readers[0]
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"Corrupt GGUF {path.name}: no general.architecture")
    if _field(reader, "dymoe.role") == "tier" or arch == "imatrix":
        raise SourceError(f"{path.name} is not a model GGUF (it is a dymoe tier sidecar or an importance matrix)")
    spec = arches.for_gguf(arch)
    n_expert = _field(reader, f"{arch}.expert_count")
    if not n_expert:
        raise UnsupportedModelError(f"{path.name} is a dense {arch} model: dymoe-gguf converts MoE models only")

    def key(name: str, default: int | None = None) -> int:
        v = _field(reader, f"{arch}.{name}")
        if v is None:
            if default is None:
                raise SourceError(f"Corrupt GGUF {path.name}: missing {arch}.{name}")
            return default
        return int(v)  # type: ignore[arg-type]

    tensors: list[SourceTensor] = []
    n_ff_exp = 0
    for t in (t for r in readers for t in r.tensors):
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml ne -> numpy order
        qtype = QT(t.tensor_type)
        m = BASE_NAME_RE.match(t.name)
        if m:
            if not dequantizable(qtype):
                raise SourceError(f"Expert tensor {t.name} of {path.name} is {qtype.name}, which gguf-py cannot "
                                  "dequantize: convert from the original model")
            if len(shape) != 3 or shape[0] != n_expert:
                raise SourceError(f"Corrupt GGUF {path.name}: {t.name} has shape {list(shape)}")
            n_ff_exp = shape[1] if m.group(2) != "down" else shape[2]
            tensors.append(SourceTensor(t.name, shape, layer=int(m.group(1)), matrix=m.group(2),
                                        load_expert=lambda e, t=t, q=qtype: _to_f32(t.data[e], q),
                                        raw_expert=(qtype, lambda e, t=t: np.asarray(t.data[e]))))
        else:
            layer = re.match(r"blk\.(\d+)\.", t.name)
            tensors.append(SourceTensor(
                t.name, shape, layer=int(layer.group(1)) if layer else None,
                load=(lambda t=t, q=qtype: _to_f32(t.data, q).reshape(tuple(reversed(t.shape.tolist()))))
                if dequantizable(qtype) else None,
                raw=(qtype, lambda t=t: np.asarray(t.data))))
    if not any(t.is_expert for t in tensors):
        raise UnsupportedModelError(f"{path.name} has no expert tensors")
    hp = HParams(n_layer=key("block_count"), n_embd=key("embedding_length"), n_head=key("attention.head_count"),
                 n_head_kv=key("attention.head_count_kv", key("attention.head_count")), n_expert=int(n_expert),
                 n_expert_used=key("expert_used_count"), n_ff_exp=n_ff_exp,
                 vocab_size=len(reader.get_field("tokenizer.ggml.tokens").data)
                 if reader.get_field("tokenizer.ggml.tokens") else 0, tie_embeddings=False)

    def write_metadata(w: gguf.GGUFWriter) -> None:
        for name, f in reader.fields.items():
            if name.startswith(_SKIP_KEYS) or name == "general.architecture":
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, f.contents(), vtype, sub_type=sub)

    h = hashlib.sha256()
    for p, r in zip(paths, readers):
        h.update(str(p.stat().st_size).encode())
        for t in r.tensors:
            h.update(f"{t.name}:{int(t.tensor_type)}:{t.shape.tolist()}:{int(t.data_offset)};".encode())
    return Source(kind, ident or str(path), spec, hp, tensors, write_metadata, h.hexdigest(), paths, path)
