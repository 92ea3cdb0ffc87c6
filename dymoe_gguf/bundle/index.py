"""The bundle index: (layer, matrix, expert, tier) -> file, byte offset, length, type, shape.

Built on ``gguf.GGUFReader`` (header and tensor table only; data stays on disk). Opening a bundle
validates it: format version, the bundle id linking base and sidecars, that every expert exists in
every tier with the base's shape, 16 KiB alignment, a constant per-layer stride, and file sizes.

``GGUFReader`` parses every metadata field, the tokenizer's vocabulary included (seconds for a
150k-token vocabulary, a third of a second for the bench's 4k one) — time a user waits before the
first token. So the validated index is cached (``~/.cache/dymoe-gguf/index``; override with
``DYMOE_INDEX_CACHE``, empty to switch it off), keyed by the bundle's path and each file's size, mtime and inode: the
converter writes files under a temporary name and renames them, so any change gives a new key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from dymoe_gguf.bundle.format import (
    BASE_FILE,
    FORMAT_VERSION,
    MATRICES,
    SIDECAR_NAME_RE,
    Key,
    Tier,
    aligned,
    base_expert_name,
    parse_tier,
)
from dymoe_gguf.errors import BundleError
from dymoe_gguf.util import atomic_file


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


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise BundleError(f"Bundle file {path.name} is missing from {path.parent}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:
        raise BundleError(f"Corrupt or truncated {path.name}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _get(reader: gguf.GGUFReader, key: str, path: Path) -> object:
    f = reader.get_field(key)
    if f is None:
        raise BundleError(f"{path.name} is not a dymoe-gguf bundle file: key {key} is missing "
                          "(convert the model with `dymoe-gguf convert`)")
    return f.contents()


log = logging.getLogger(__name__)
_CACHE_VERSION = 1


def _cache_dir() -> Path | None:
    env = os.environ.get("DYMOE_INDEX_CACHE")
    if env is not None:
        return Path(env) if env else None
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "dymoe-gguf" / "index"


def _signature(paths: list[Path]) -> list[tuple[str, int, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return out


class BundleIndex:
    """Read-only index of a bundle directory."""

    def __init__(self, root: Path, use_cache: bool = True) -> None:
        root = Path(root)
        if root.is_file() and root.name.endswith(".gguf"):
            root = root.parent
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
            if version != _CACHE_VERSION or _signature([self.root / name for name, *_ in sig]) != sig:
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
            sig = _signature([self.base_path, *self.tier_paths.values()])
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cache) as tmp, open(tmp, "wb") as f:
                pickle.dump((_CACHE_VERSION, sig, self.__dict__), f, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as exc:  # a read-only home is not an error
            log.debug("bundle index not cached: %s", exc)

    # ------------------------------------------------------------------ building
    def _build(self, root: Path) -> None:
        self.base_path = root / BASE_FILE
        base = _open(self.base_path)
        version = _get(base, Key.FORMAT_VERSION, self.base_path)
        if version != FORMAT_VERSION:
            raise BundleError(f"Bundle format {version} is not supported: expected {FORMAT_VERSION}; "
                              "re-convert with this version of dymoe-gguf")
        self.bundle_id = str(_get(base, Key.BUNDLE_ID, self.base_path))
        self.arch = str(_get(base, "general.architecture", self.base_path))
        self.base_tier = parse_tier(str(_get(base, Key.BASE_TIER, self.base_path)))
        self.tiers = tuple(parse_tier(str(t)) for t in _get(base, Key.TIERS, self.base_path))  # type: ignore[union-attr]
        tier_files = [str(t) for t in _get(base, Key.TIER_FILES, self.base_path)]  # type: ignore[union-attr]
        self.n_layer = int(_get(base, Key.N_LAYER, self.base_path))  # type: ignore[arg-type]
        self.n_expert = int(_get(base, Key.N_EXPERT, self.base_path))  # type: ignore[arg-type]
        self.moe_layers = tuple(int(x) for x in _get(base, Key.MOE_LAYERS, self.base_path))  # type: ignore[union-attr]
        self.alignment = int(_get(base, Key.EXPERT_ALIGNMENT, self.base_path))  # type: ignore[arg-type]
        self.source = {"kind": _get(base, Key.SOURCE_KIND, self.base_path),
                       "id": _get(base, Key.SOURCE_ID, self.base_path),
                       "fingerprint": _get(base, Key.SOURCE_FINGERPRINT, self.base_path)}
        self.base_tensors = {t.name: BaseTensor(t.name, int(t.data_offset), int(t.n_bytes), QT(t.tensor_type),
                                                tuple(int(x) for x in reversed(t.shape.tolist())))
                             for t in base.tensors}
        self._check_size(self.base_path, self.base_tensors.values())
        self.tier_paths = {tier: root / name for tier, name in zip(self.tiers, tier_files)}
        self._slices: dict[tuple[int, str, int, Tier], ExpertSlice] = {}
        for tier, path in self.tier_paths.items():
            self._index_sidecar(tier, path)
        self._check_complete()
        self._views = {(lay, m, t): self._make_view(lay, m, t)
                       for lay in self.moe_layers for m in MATRICES for t in self.tiers}

    # ------------------------------------------------------------------ building
    def _index_sidecar(self, tier: Tier, path: Path) -> None:
        r = _open(path)
        if _get(r, Key.BUNDLE_ID, path) != self.bundle_id:
            raise BundleError(f"{path.name} does not belong to this bundle (bundle id differs from "
                              f"{BASE_FILE}): it comes from another conversion; re-convert the bundle")
        if _get(r, Key.ROLE, path) != "tier" or parse_tier(str(_get(r, Key.TIER, path))) != tier:
            raise BundleError(f"{path.name} does not hold tier {tier.name}")
        ends = []
        for t in r.tensors:
            m = SIDECAR_NAME_RE.match(t.name)
            if not m:
                raise BundleError(f"{path.name}: unexpected tensor {t.name}")
            layer, matrix, expert = int(m.group(1)), m.group(2), int(m.group(3))
            s = ExpertSlice(layer, matrix, expert, tier, path, int(t.data_offset), int(t.n_bytes),
                            QT(t.tensor_type), (int(t.shape[1]), int(t.shape[0])))
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
