"""The bundle index: (layer, matrix, expert, tier) -> file, byte offset, length, type, shape.

Built from each file's header and tensor table (:mod:`dymoe_gguf.bundle.header`; data stays on
disk). Opening a bundle validates it: format version, roles, the bundle id linking base and
sidecars, that every expert exists in every tier with the base's shape, 16 KiB alignment, a
constant per-layer stride, and file sizes.

The header reader steps over the tokenizer's vocabulary without decoding it (``gguf.GGUFReader``
decodes every token: 4–6 s for a 50k-token vocabulary here, against 0.1 s). The validated index is
also cached (``~/.cache/dymoe-gguf/index``; override with ``DYMOE_INDEX_CACHE``, empty to switch it
off), keyed by the bundle's path and, per file, its size and an xxh3 hash of its header (metadata
and tensor table: everything the index is built from). A file rewritten in place — even with its
mtime restored — has another header (its ``dymoe.bundle_id`` at least) and so another key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from gguf import GGMLQuantizationType as QT

from dymoe_gguf.bundle.format import (
    BASE_FILE,
    BUNDLE_ENTRY_RE,
    FORMAT_VERSION,
    MATRICES,
    SIDECAR_NAME_RE,
    Key,
    Tier,
    aligned,
    base_expert_name,
    parse_tier,
    row_bytes,
    sidecar_expert_name,
    sidecar_file,
)
from dymoe_gguf.bundle.header import Header, HeaderError, open_no_readahead, read_header
from dymoe_gguf.errors import BundleError, DymoeError
from dymoe_gguf.util import atomic_file, read_error


@dataclass(frozen=True)
class ExpertSlice:
    """Where one expert matrix of one tier lives."""

    layer: int
    matrix: str
    expert: int
    tier: Tier
    file: Path
    offset: int  # absolute byte offset in file
    nbytes: int
    ggml_type: QT  # may differ from tier.ggml_type where a fallback applied
    shape: tuple[int, int]  # numpy order: (n_out, n_in)


@dataclass(frozen=True)
class LayerView:
    """All experts of (layer, matrix) in one tier, as one strided 3-D region of one file."""

    file: Path
    offset: int  # expert 0
    stride: int  # bytes from expert e to e+1 (nb[2] of a ggml view)
    expert_nbytes: int
    ggml_type: QT
    shape: tuple[int, int]  # (n_out, n_in) of one expert
    n_expert: int


@dataclass(frozen=True)
class BaseTensor:
    """A tensor of the base GGUF."""

    name: str
    offset: int
    nbytes: int
    ggml_type: QT
    shape: tuple[int, ...]  # numpy order


def _read(path: Path) -> Header:
    """``path``'s metadata (the vocabulary skipped, not decoded) and tensor table."""
    if not path.exists():
        raise BundleError(f"Bundle file {path.name} is missing from {path.parent}")
    if not path.is_file():
        raise BundleError(f"Bundle file {path} is not a file")
    try:
        return read_header(path, None, tensors=True, skip=("tokenizer.",))
    except OSError as exc:
        raise BundleError(read_error(path, exc)) from None
    except HeaderError as exc:
        raise BundleError(f"Corrupt or truncated {path.name}: {exc}") from None


def _get(head: Header, key: str, path: Path) -> object:
    if key not in head.values:
        raise BundleError(f"{path.name} is not a dymoe-gguf bundle file: key {key} is missing "
                          "(convert the model with `dymoe-gguf convert`)")
    return head.values[key]


def _tensors(head: Header, path: Path) -> list[BaseTensor]:
    """The tensor table with absolute offsets and byte sizes."""
    out = []
    assert head.data_start is not None
    for t in head.tensors:
        try:
            qtype = QT(t.ggml_type)
            rows = int(np.prod(t.ne[1:], dtype=np.int64))
            nbytes = rows * row_bytes(qtype, t.ne[0])
        except ValueError as exc:
            raise BundleError(f"Corrupt {path.name}: tensor {t.name}: {exc}") from None
        out.append(BaseTensor(t.name, head.data_start + t.offset, nbytes, qtype, tuple(reversed(t.ne))))
    return out


def _hparams(head: Header, arch: str) -> dict[str, int | bool]:
    """The model hyper-parameters memory estimates and ``inspect`` need, from the base file's metadata."""
    def num(key: str, default: int) -> int:
        v = head.values.get(f"{arch}.{key}")
        if isinstance(v, (np.ndarray, list)):  # per-layer values (some architectures): the largest
            v = max((x for x in np.asarray(v).reshape(-1).tolist() if isinstance(x, (int, float))), default=None)
        return int(v) if isinstance(v, (int, float)) else default

    n_head, n_embd = num("attention.head_count", 0), num("embedding_length", 0)
    head_dim = n_embd // n_head if n_head else 0
    return {"n_layer": num("block_count", 0), "n_embd": n_embd, "n_head": n_head,
            "n_head_kv": num("attention.head_count_kv", n_head), "key_length": num("attention.key_length", head_dim),
            "value_length": num("attention.value_length", head_dim), "context_length": num("context_length", 0),
            "n_expert_used": num("expert_used_count", 0),
            "n_vocab": head.array_lengths.get("tokenizer.ggml.tokens", 0),
            "chat_template": "tokenizer.chat_template" in head.value_offsets}


log = logging.getLogger(__name__)
_CACHE_VERSION = 2


def _cache_dir() -> Path | None:
    env = os.environ.get("DYMOE_INDEX_CACHE")
    if env is not None:
        return Path(env) if env else None
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "dymoe-gguf" / "index"


def _signature(paths: list[Path], header_bytes: list[int]) -> list[tuple[str, int, int, int]]:
    """Per file: name, size, header length and the xxh3 of the header's bytes."""
    out = []
    for p, n in zip(paths, header_bytes):
        with open_no_readahead(p, buffering=0) as f:  # the header only: no read-ahead into the experts
            size = os.fstat(f.fileno()).st_size
            out.append((p.name, size, n, xxhash.xxh3_64_intdigest(f.read(n))))
    return out


class BundleIndex:
    """Read-only index of a bundle directory."""

    def __init__(self, root: Path, use_cache: bool = True) -> None:
        root = Path(root)
        if root.is_file() and root.name.endswith(".gguf"):
            if not (BUNDLE_ENTRY_RE.match(root.name) and (root.parent / BASE_FILE).is_file()):
                raise BundleError(f"{root} is a GGUF file, not a bundle: make one with "
                                  f"`dymoe-gguf convert {root} -o {root.stem}.dymoe`")
            root = root.parent
        if root.exists() and not root.is_dir():
            raise BundleError(f"Bundle {root} is a file, not a bundle directory written by `dymoe-gguf convert`")
        if not root.is_dir():
            raise BundleError(f"Bundle {root} does not exist: expected a directory written by `dymoe-gguf convert`")
        root = root.resolve()  # cached paths must not depend on the working directory
        self.root = root
        where = _cache_dir() if use_cache else None
        cache = where / (hashlib.sha1(str(root).encode()).hexdigest() + ".pkl") if where else None
        if cache is not None and self._load_cached(cache):
            return
        self._build(root)
        if cache is not None:
            self._store_cached(cache)

    # ------------------------------------------------------------------ cache
    def _load_cached(self, cache: Path) -> bool:
        try:
            with open(cache, "rb") as f:
                version, sig, state = pickle.load(f)
            if version != _CACHE_VERSION:
                return False
            if _signature([self.root / name for name, *_ in sig], [n for _name, _size, n, _h in sig]) != sig:
                return False
            if sig[0][0] != BASE_FILE:
                return False
        except Exception:  # missing, stale, unreadable: rebuild
            return False
        root = self.root
        self.__dict__.update(state)
        self.root = root
        return True

    def _store_cached(self, cache: Path) -> None:
        try:
            paths = [self.base_path, *self.tier_paths.values()]
            sig = _signature(paths, [self._header_bytes[p.name] for p in paths])
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cache) as tmp, open(tmp, "wb") as f:
                pickle.dump((_CACHE_VERSION, sig, self.__dict__), f, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as exc:  # a read-only home is not an error
            log.debug("bundle index not cached: %s", exc)

    # ------------------------------------------------------------------ building
    def _build(self, root: Path) -> None:
        self.base_path = root / BASE_FILE
        base = _read(self.base_path)
        self._header_bytes = {BASE_FILE: int(base.data_start or 0)}
        version = _get(base, Key.FORMAT_VERSION, self.base_path)
        if version != FORMAT_VERSION:
            raise BundleError(f"Bundle format {version} is not supported: expected {FORMAT_VERSION}; "
                              "re-convert with this version of dymoe-gguf")
        if _get(base, Key.ROLE, self.base_path) != "base":
            raise BundleError(f"{BASE_FILE} is not a bundle's base file ({Key.ROLE} is "
                              f"{_get(base, Key.ROLE, self.base_path)!r}): was a sidecar renamed?")
        self.bundle_id = str(_get(base, Key.BUNDLE_ID, self.base_path))
        self.arch = str(_get(base, "general.architecture", self.base_path))
        try:
            self.base_tier = parse_tier(str(_get(base, Key.BASE_TIER, self.base_path)))
            self.tiers = tuple(parse_tier(str(t)) for t in _get(base, Key.TIERS, self.base_path))  # type: ignore[union-attr]
            tier_files = [str(t) for t in _get(base, Key.TIER_FILES, self.base_path)]  # type: ignore[union-attr]
            self.n_layer = int(_get(base, Key.N_LAYER, self.base_path))  # type: ignore[arg-type]
            self.n_expert = int(_get(base, Key.N_EXPERT, self.base_path))  # type: ignore[arg-type]
            self.moe_layers = tuple(int(x) for x in _get(base, Key.MOE_LAYERS, self.base_path))  # type: ignore[union-attr]
            self.alignment = int(_get(base, Key.EXPERT_ALIGNMENT, self.base_path))  # type: ignore[arg-type]
        except (DymoeError, TypeError, ValueError) as exc:
            raise BundleError(f"Corrupt {BASE_FILE}: bad dymoe metadata ({exc})") from None
        if ([sidecar_file(t) for t in self.tiers] != tier_files or not self.tiers or self.n_expert < 1
                or self.alignment < 1 or not all(0 <= layer < self.n_layer for layer in self.moe_layers)):
            raise BundleError(f"Corrupt {BASE_FILE}: inconsistent dymoe metadata (tiers {list(self.tiers)}, "
                              f"files {tier_files}, {self.n_expert} experts, MoE layers {list(self.moe_layers)} of "
                              f"{self.n_layer})")
        self.source = {"kind": _get(base, Key.SOURCE_KIND, self.base_path),
                       "id": _get(base, Key.SOURCE_ID, self.base_path),
                       "fingerprint": _get(base, Key.SOURCE_FINGERPRINT, self.base_path)}
        self.hparams = _hparams(base, self.arch)
        algo = base.values.get(Key.CHECKSUM_ALGO)
        self.checksum_algo = str(algo) if algo is not None else None
        self.base_tensors = {t.name: t for t in _tensors(base, self.base_path)}
        self._check_size(self.base_path, self.base_tensors.values())
        self.tier_paths = {tier: root / name for tier, name in zip(self.tiers, tier_files)}
        self._slices: dict[tuple[int, str, int, Tier], ExpertSlice] = {}
        for tier, path in self.tier_paths.items():
            self._index_sidecar(tier, path)
        self._check_complete()
        self._views = {(lay, m, t): self._make_view(lay, m, t)
                       for lay in self.moe_layers for m in MATRICES for t in self.tiers}

    def _index_sidecar(self, tier: Tier, path: Path) -> None:
        r = _read(path)
        self._header_bytes[path.name] = int(r.data_start or 0)
        if _get(r, Key.BUNDLE_ID, path) != self.bundle_id:
            raise BundleError(f"{path.name} does not belong to this bundle (bundle id differs from "
                              f"{BASE_FILE}): it comes from another conversion; re-convert the bundle")
        if _get(r, Key.ROLE, path) != "tier" or parse_tier(str(_get(r, Key.TIER, path))) != tier:
            raise BundleError(f"{path.name} does not hold tier {tier.name}")
        ends = []
        for t in _tensors(r, path):
            m = SIDECAR_NAME_RE.match(t.name)
            if not m or len(t.shape) != 2:
                raise BundleError(f"{path.name}: unexpected tensor {t.name} {list(t.shape)}")
            layer, matrix, expert = int(m.group(1)), m.group(2), int(m.group(3))
            s = ExpertSlice(layer, matrix, expert, tier, path, t.offset, t.nbytes, t.ggml_type,
                            (t.shape[0], t.shape[1]))
            if s.offset % self.alignment:
                raise BundleError(f"{path.name}: {t.name} is not {self.alignment}-byte aligned")
            self._slices[(layer, matrix, expert, tier)] = s
            ends.append(s.offset + s.nbytes)
        if ends and path.stat().st_size < max(ends):
            raise BundleError(f"{path.name} is truncated: expected at least {max(ends)} bytes, "
                              f"found {path.stat().st_size}")

    @staticmethod
    def _check_size(path: Path, tensors) -> None:
        end = max((t.offset + t.nbytes for t in tensors), default=0)
        if path.stat().st_size < end:
            raise BundleError(f"{path.name} is truncated: expected at least {end} bytes, found {path.stat().st_size}")

    def _check_complete(self) -> None:
        for layer in self.moe_layers:
            for m in MATRICES:
                base = self.base_tensors.get(base_expert_name(layer, m))
                if base is None:
                    raise BundleError(f"{BASE_FILE} lacks the {m} experts of layer {layer}")
                for tier in self.tiers:
                    for e in range(self.n_expert):
                        s = self._slices.get((layer, m, e, tier))
                        if s is None:
                            raise BundleError(f"{self.tier_paths[tier].name} lacks layer {layer} {m} expert {e}")
                        if s.shape != base.shape[1:]:
                            raise BundleError(f"{s.file.name}: layer {layer} {m} expert {e} has shape "
                                              f"{list(s.shape)}, {BASE_FILE} has {list(base.shape[1:])}")

    def _make_view(self, layer: int, matrix: str, tier: Tier) -> LayerView | None:
        s0 = self._slices[(layer, matrix, 0, tier)]
        stride = aligned(s0.nbytes, self.alignment)
        for e in range(1, self.n_expert):
            if self._slices[(layer, matrix, e, tier)].offset != s0.offset + e * stride:
                return None  # not strided: per-expert views only
        return LayerView(s0.file, s0.offset, stride, s0.nbytes, s0.ggml_type, s0.shape, self.n_expert)

    # ------------------------------------------------------------------ queries
    def slice(self, layer: int, matrix: str, expert: int, tier: Tier) -> ExpertSlice:
        """Location of one expert matrix in one tier."""
        try:
            return self._slices[(layer, matrix, expert, tier)]
        except KeyError:
            raise BundleError(f"No expert ({layer}, {matrix}, {expert}) in tier {tier.name}") from None

    def layer_view(self, layer: int, matrix: str, tier: Tier) -> LayerView:
        """The strided region holding every expert of (layer, matrix) in ``tier``."""
        v = self._views.get((layer, matrix, tier))
        if v is None:
            raise BundleError(f"Tier {tier.name} of layer {layer} {matrix} is not laid out with a constant stride")
        return v

    def expert_bytes(self) -> np.ndarray:
        """``[n_layer, n_expert, n_tiers]`` bytes of one expert (gate+up+down) per tier; 0 for dense layers."""
        out = np.zeros((self.n_layer, self.n_expert, len(self.tiers)), dtype=np.int64)
        for (layer, _m, e, tier), s in self._slices.items():
            out[layer, e, self.tiers.index(tier)] += s.nbytes
        return out

    def file_tensors(self) -> dict[Path, list[tuple[str, int, int]]]:
        """Per file (base first), ``(name, offset, nbytes)`` of each tensor in tensor-table order."""
        out: dict[Path, list[tuple[str, int, int]]] = {
            self.base_path: [(t.name, t.offset, t.nbytes) for t in self.base_tensors.values()]}
        for path in self.tier_paths.values():
            out[path] = []
        for (layer, matrix, expert, _tier), s in self._slices.items():  # inserted in each file's table order
            out[s.file].append((sidecar_expert_name(layer, matrix, expert), s.offset, s.nbytes))
        return out

    def tier_file_bytes(self) -> dict[str, int]:
        """On-disk size of each file of the bundle."""
        files = {BASE_FILE: self.base_path} | {p.name: p for p in self.tier_paths.values()}
        return {name: p.stat().st_size for name, p in files.items()}

    def to_dict(self) -> dict:
        """Summary used by ``dymoe-gguf inspect --json``."""
        eb = self.expert_bytes()
        return {
            "path": str(self.root),
            "bundle_id": self.bundle_id,
            "arch": self.arch,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "moe_layers": list(self.moe_layers),
            "base_tier": self.base_tier.name,
            "tiers": [t.name for t in self.tiers],
            "alignment": self.alignment,
            "files": self.tier_file_bytes(),
            "expert_bytes_per_tier": {t.name: int(eb[:, :, i].sum()) for i, t in enumerate(self.tiers)},
            "expert_bytes_per_layer": {t.name: [int(x) for x in eb[:, :, i].sum(axis=1)]
                                       for i, t in enumerate(self.tiers)},
            "strided_layers": all(v is not None for v in self._views.values()),
            "source": self.source,
            "valid": True,
        }
