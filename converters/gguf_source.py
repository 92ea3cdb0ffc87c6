"""An existing GGUF as a conversion source: experts are requantized into tiers.

Expert tensors must be F32/F16/BF16/Q8_0 (requantizing an already lossy K-quant would stack two
rounding errors); other tensors pass through with their type unless an override asks otherwise.
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

QT = gguf.GGMLQuantizationType
_REQUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q8_0)
_SKIP_KEYS = ("GGUF.", "general.alignment", "general.file_type", "dymoe.")


def open_reader(path: Path) -> gguf.GGUFReader:
    """GGUFReader with corrupt or truncated files turned into a SourceError."""
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # GGUFReader raises ValueError/struct.error/IndexError on bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"Corrupt or truncated GGUF {path.name}: {msg}") from None


def _field(reader: gguf.GGUFReader, key: str) -> object | None:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _to_f32(data: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return np.array(data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)


def open_gguf(path: Path) -> Source:
    """Read a GGUF whose experts are F32/F16/BF16/Q8_0."""
    reader = open_reader(path)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"Corrupt GGUF {path.name}: no general.architecture")
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
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml ne -> numpy order
        qtype = QT(t.tensor_type)
        m = BASE_NAME_RE.match(t.name)
        if m:
            if qtype not in _REQUANTIZABLE:
                raise SourceError(f"Expert tensor {t.name} of {path.name} is {qtype.name}: expected "
                                  "F32/F16/BF16/Q8_0 experts to requantize (convert from the original model)")
            if len(shape) != 3 or shape[0] != n_expert:
                raise SourceError(f"Corrupt GGUF {path.name}: {t.name} has shape {list(shape)}")
            n_ff_exp = shape[1] if m.group(2) != "down" else shape[2]
            tensors.append(SourceTensor(t.name, shape, layer=int(m.group(1)), matrix=m.group(2),
                                        load_expert=lambda e, t=t, q=qtype: _to_f32(t.data[e], q)))
        else:
            layer = re.match(r"blk\.(\d+)\.", t.name)
            tensors.append(SourceTensor(
                t.name, shape, layer=int(layer.group(1)) if layer else None,
                load=(lambda t=t, q=qtype: _to_f32(t.data, q).reshape(tuple(reversed(t.shape.tolist()))))
                if qtype in _REQUANTIZABLE else None,
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
    h.update(str(path.stat().st_size).encode())
    for t in reader.tensors:
        h.update(f"{t.name}:{int(t.tensor_type)}:{t.shape.tolist()}:{int(t.data_offset)};".encode())
    return Source("gguf", str(path), spec, hp, tensors, write_metadata, h.hexdigest(), [path])
