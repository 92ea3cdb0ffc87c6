"""Conversion sources: what a converter needs from a checkpoint, read lazily.

A :class:`Source` is the list of tensors the base GGUF will hold, in file order, each with a
loader that materialises one tensor (or one expert of an expert tensor) as float32, plus a
function that writes the model's metadata (hyper-parameters, tokenizer) into a GGUF writer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from dymoe_gguf.converters import arch as arches
from dymoe_gguf.converters.arch._common import (
    ArchSpec,
    HParams,
    base_expert_name,
    classify_expert,
    map_name,
    permute_qk,
    read_hparams,
    write_hparams,
)
from dymoe_gguf.converters.safetensors_io import TensorRef, index_safetensors, load_f32
from dymoe_gguf.converters.tokenizer import write_tokenizer
from dymoe_gguf.errors import SourceError, UnsupportedModelError

Loader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the base GGUF, described before any data is read.

    ``shape`` is in numpy order (rows last-but-one, columns last); expert tensors are
    ``(n_expert, n_out, n_in)`` and load one expert at a time through ``load_expert``.
    """

    name: str
    shape: tuple[int, ...]
    load: Loader | None = None  # whole tensor as float32 (non-expert tensors)
    load_expert: Callable[[int], np.ndarray] | None = None  # expert e as float32 (n_out, n_in)
    layer: int | None = None
    matrix: str | None = None  # "gate" | "up" | "down" for expert tensors
    # A GGUF source may pass a non-expert tensor through unchanged: (ggml type, raw bytes loader)
    raw: tuple[gguf.GGMLQuantizationType, Callable[[], np.ndarray]] | None = None
    # ... and an expert's bytes in the source's own type: (ggml type, expert e -> raw bytes)
    raw_expert: tuple[gguf.GGMLQuantizationType, Callable[[int], np.ndarray]] | None = None

    @property
    def is_expert(self) -> bool:
        return self.matrix is not None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Source:
    """A readable MoE checkpoint."""

    kind: str  # "hf-dir" | "hf-repo" | "gguf"
    ident: str  # as the user named it
    spec: ArchSpec
    hparams: HParams
    tensors: list[SourceTensor]
    write_metadata: Callable[[gguf.GGUFWriter], None]
    fingerprint: str
    files: list[Path] = field(default_factory=list)
    root: Path | None = None  # the directory or file the user named (the output must not replace it)

    @property
    def moe_layers(self) -> list[int]:
        return sorted({t.layer for t in self.tensors if t.is_expert and t.layer is not None})


# --------------------------------------------------------------------------- Hugging Face directory


def _load_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"No config.json in {path}: expected a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"Invalid config.json in {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"Invalid config.json in {path}: expected a JSON object")
    text = cfg.get("text_config")
    return cfg | text if isinstance(text, dict) else cfg


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SourceError(f"Invalid model.safetensors.index.json: {exc}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise SourceError(f"Shard {missing[0]} named in model.safetensors.index.json is missing from {path}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {other[0]}: re-save it with safe_serialization=True)" if other else ""
        raise SourceError(f"No weights in {path}: expected model.safetensors or sharded *.safetensors{hint}")
    return files


def _fingerprint(cfg_bytes: bytes, table: list[tuple[str, str, tuple[int, ...]]]) -> str:
    h = hashlib.sha256(cfg_bytes)
    for name, dtype, shape in sorted(table):
        h.update(f"{name}:{dtype}:{shape};".encode())
    return h.hexdigest()


def open_hf_dir(path: Path, *, kind: str = "hf-dir", ident: str | None = None) -> Source:
    """Read a local Hugging Face model directory (config.json + safetensors + tokenizer)."""
    if not path.exists():
        raise SourceError(f"Source {path} does not exist")
    if not path.is_dir():
        raise SourceError(f"Source {path} is not a directory or .gguf file")
    if not any(path.iterdir()):
        raise SourceError(f"Source directory {path} is empty")
    cfg = _load_config(path)
    spec = arches.for_hf(cfg.get("architectures"))
    hp = read_hparams(spec, cfg)
    files = _weight_files(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise SourceError(f"No tokenizer in {path}: expected tokenizer.json or tokenizer.model")
    refs = index_safetensors(files)
    tensors = _plan_hf_tensors(spec, hp, refs)
    fp = _fingerprint((path / "config.json").read_bytes(),
                      [(n, r.dtype, r.shape) for n, r in refs.items()])

    def write_metadata(w: gguf.GGUFWriter) -> None:
        w.add_name(cfg.get("_name_or_path") or path.name)
        write_hparams(spec, w, cfg, hp)
        write_tokenizer(w, path, hp.vocab_size)

    return Source(kind, ident or str(path), spec, hp, tensors, write_metadata, fp, files, path)


def _check_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(want):
        raise SourceError(f"config.json and weights disagree: {name} has shape {list(shape)}, "
                          f"config implies {list(want)}")


def _plan_hf_tensors(spec: ArchSpec, hp: HParams, refs: dict[str, TensorRef]) -> list[SourceTensor]:
    per_expert: dict[tuple[int, str], dict[int, TensorRef]] = {}
    fused: dict[tuple[int, str], TensorRef] = {}
    plain: list[SourceTensor] = []
    for name, ref in refs.items():
        ex = classify_expert(spec, name)
        if ex is not None:
            if ex.expert is None:
                fused[(ex.layer, ex.matrix)] = ref
            else:
                per_expert.setdefault((ex.layer, ex.matrix), {})[ex.expert] = ref
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gname = map_name(spec, hp.n_layer, name)
        if gname is None:
            raise UnsupportedModelError(f"Cannot map tensor {name!r} of a {spec.name} checkpoint to GGUF")
        plain.append(_plain(spec, hp, gname, ref))

    experts: list[SourceTensor] = []
    layers = sorted({layer for layer, _ in per_expert} | {layer for layer, _ in fused})
    if not layers:
        raise UnsupportedModelError("The model is dense (no expert weights found): "
                                    "dymoe-gguf converts Mixture-of-Experts models only")
    for layer in layers:
        for matrix in ("gate", "up", "down"):
            experts.append(_expert_tensor(hp, layer, matrix, per_expert, fused))
    # file order: embeddings, then layer by layer (attention, norms, router, experts), then output
    def order(t: SourceTensor) -> tuple[int, int, str]:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m:
            return (1, int(m.group(1)), ("1" if t.is_expert else "0") + t.name)
        return (0 if t.name.startswith("token_embd") else 2, 0, t.name)
    return sorted(plain + experts, key=order)


def _plain(spec: ArchSpec, hp: HParams, gname: str, ref: TensorRef) -> SourceTensor:
    permute = None
    if spec.permute_qk and re.search(r"\.attn_q\.(weight|bias)$", gname):
        permute = hp.n_head
    elif spec.permute_qk and re.search(r"\.attn_k\.(weight|bias)$", gname):
        permute = hp.n_head_kv

    def load() -> np.ndarray:
        a = load_f32(ref)
        return permute_qk(a, permute) if permute else a

    layer = re.match(r"blk\.(\d+)\.", gname)
    return SourceTensor(gname, ref.shape, load=load, layer=int(layer.group(1)) if layer else None)


def _expert_tensor(hp: HParams, layer: int, matrix: str,
                   per_expert: dict[tuple[int, str], dict[int, TensorRef]],
                   fused: dict[tuple[int, str], TensorRef]) -> SourceTensor:
    d, ff, n = hp.n_embd, hp.n_ff_exp, hp.n_expert
    want = (ff, d) if matrix in ("gate", "up") else (d, ff)
    name = base_expert_name(layer, matrix)
    if (layer, matrix) in per_expert:
        got = per_expert[(layer, matrix)]
        if sorted(got) != list(range(n)):
            raise SourceError(f"config.json and weights disagree: config declares {n} experts, "
                              f"layer {layer} {matrix} has {len(got)}")
        for e, ref in got.items():
            _check_shape(f"layer {layer} expert {e} {matrix}", ref.shape, want)
        return SourceTensor(name, (n, *want), load_expert=lambda e: load_f32(got[e]), layer=layer, matrix=matrix)
    key = (layer, "gate_up") if matrix in ("gate", "up") else (layer, "down")
    if key not in fused:
        raise SourceError(f"Weights are missing the {matrix} experts of layer {layer}")
    ref = fused[key]
    if ref.shape[0] != n:
        raise SourceError(f"config.json and weights disagree: config declares {n} experts, "
                          f"layer {layer} fused {matrix} tensor has {ref.shape[0]}")
    if matrix == "down":
        transpose = ref.shape[1:] == (ff, d) and ff != d
        _check_shape(f"layer {layer} down experts", ref.shape[1:][::-1] if transpose else ref.shape[1:], want)
    else:
        transpose = ref.shape[1:] == (d, 2 * ff)
        _check_shape(f"layer {layer} gate_up experts", ref.shape[1:][::-1] if transpose else ref.shape[1:],
                     (2 * ff, d))
    part = slice(0, ff) if matrix == "gate" else slice(ff, 2 * ff)
    return SourceTensor(name, (n, *want), load_expert=_slice_expert(ref, transpose, part, matrix),
                        layer=layer, matrix=matrix)


def _slice_expert(ref: TensorRef, transpose: bool, part: slice, matrix: str) -> Callable[[int], np.ndarray]:
    """Loader reading only expert e's bytes of a fused 3-D tensor."""
    per = int(np.prod(ref.shape[1:]))
    itemsize = ref.nbytes // int(np.prod(ref.shape))

    def load_expert(e: int) -> np.ndarray:
        one = TensorRef(ref.file, ref.offset + e * per * itemsize, ref.dtype, tuple(ref.shape[1:]))
        x = load_f32(one)
        x = x.T if transpose else x
        return np.ascontiguousarray(x if matrix == "down" else x[part])

    return load_expert
