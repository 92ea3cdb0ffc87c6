"""Test GGUFs as users download them: a full-precision model re-quantized by ggml, written with gguf-py."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from dymoe_gguf._native import ggml

QT = gguf.GGMLQuantizationType

# llama.cpp's Q4_K_M recipe, reduced to what matters here: experts' gate/up Q4_K, down Q6_K, attention
# V and the output Q6_K, the rest of the matrices Q4_K; norms and routers stay F32.
MIXES: dict[str, Callable[[str], QT]] = {
    "Q4_K_M": lambda n: QT.Q6_K if re.search(r"ffn_down|attn_v|^output\.", n) else QT.Q4_K,
    "Q5_K_M": lambda n: QT.Q6_K if re.search(r"ffn_down|attn_v|^output\.", n) else QT.Q5_K,
    "Q6_K": lambda n: QT.Q6_K,
    "Q8_0": lambda n: QT.Q8_0,
}


def quantize_gguf(src: Path, out: Path, mix: str, split_tensors: int = 0) -> Path:
    """Write ``out``: ``src`` (an F32 GGUF) with every matrix quantized as llama-quantize's ``mix`` would;
    with ``split_tensors``, as a split GGUF (``out``'s stem + ``-0000N-of-0000M.gguf``; returns the first part)."""
    r = gguf.GGUFReader(src, "r")
    arch = str(r.get_field("general.architecture").contents())
    w = gguf.GGUFWriter(out, arch, split_max_tensors=split_tensors)
    # Downloaded K-quants are usually made with an importance matrix; their bytes are then not what
    # quantizing their own dequantized values gives again, so copying them is observable.
    rng = np.random.default_rng(7)
    for name, f in r.fields.items():
        if name.startswith(("GGUF.", "dymoe.", "general.file_type", "general.alignment")) or name == \
                "general.architecture":
            continue
        w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        x = np.asarray(t.data, dtype=np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if len(shape) == 1 or re.search(r"_norm|ffn_gate_inp", t.name):
            w.add_tensor(t.name, x.reshape(shape))
            continue
        q = MIXES[mix](t.name)
        imp = rng.uniform(0.1, 10.0, shape[-1]).astype(np.float32)
        raw = ggml.quantize(x.reshape(-1, shape[-1]), q, imp).reshape(*shape[:-1], -1)
        w.add_tensor(t.name, raw, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_tensors:
        parts = sorted(out.parent.glob(out.stem + "-*-of-*.gguf"))
        assert len(parts) > 1, parts
        return parts[0]
    return out


def fake_hub_cache(root: Path, repo: str, files: dict[str, Path], rev: str = "0" * 40,
                   ref: str | None = "main") -> str:
    """huggingface-hub's cache layout: models--owner--name/{refs/REF, snapshots/REV/FILES}; returns the repo id."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(path.read_bytes())
    if ref is not None:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / ref).write_text(rev)
    return repo
