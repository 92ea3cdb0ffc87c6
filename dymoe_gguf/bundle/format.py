"""The bundle format, spelled out in one place.

A bundle is a directory::

    OUT/
      model.gguf            base GGUF: a normal llama.cpp model, experts stored at the base tier
      experts.Q2_K.gguf     one sidecar per tier: every expert matrix of every layer as its own
      experts.Q4_K.gguf     2-D tensor ``blk.{L}.ffn_{gate,up,down}_exps.{E}``, each starting on a
      experts.Q8_0.gguf     16 KiB boundary (``general.alignment = 16384``)
      calibration.gguf      optional: the importance profile written by ``dymoe-gguf calibrate``

Within a sidecar, the experts of one (layer, matrix) are written consecutively, so they sit at a
constant stride (the expert's byte size rounded up to 16 KiB): a whole layer can be viewed as one
3-D ggml tensor with ``nb[2] = stride``, and one expert can be paged in or out on its own.

Every file carries keys under ``dymoe.``; ``dymoe.bundle_id`` is a random id written to all files of
one conversion, so a sidecar from another conversion is detected.
"""

from __future__ import annotations

import enum
import re

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from dymoe_gguf.errors import DymoeError

FORMAT_VERSION = 1
# 16 KiB covers 4 KiB (Linux x86/ARM) and 16 KiB (Apple silicon, some ARM kernels) pages.
EXPERT_ALIGNMENT = 16384

BASE_FILE = "model.gguf"
CALIBRATION_FILE = "calibration.gguf"
SIDECAR_TEMPLATE = "experts.{tier}.gguf"

# Matrices of one expert, in GGUF naming (blk.N.ffn_{m}_exps.weight).
MATRICES = ("gate", "up", "down")
BASE_EXPERT_TENSOR = "blk.{layer}.ffn_{matrix}_exps.weight"
SIDECAR_EXPERT_TENSOR = "blk.{layer}.ffn_{matrix}_exps.{expert}"
BASE_NAME_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
SIDECAR_NAME_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)$")
# Every name a bundle directory may hold: its files, and atomic_file's temporary names for them.
BUNDLE_ENTRY_RE = re.compile(r"^\.?(model|calibration|experts\.[A-Z0-9_]+)\.gguf(\.[\w]+\.tmp)?$")
# Per-tensor checksums: xxh3 (64-bit) of each tensor's bytes, in tensor-table order. A fast
# non-cryptographic hash: it detects corruption (bit flips, torn writes), not tampering.
CHECKSUM_ALGO = "xxh3_64"


def base_expert_name(layer: int, matrix: str) -> str:
    """Name of the 3-D expert tensor of ``layer`` and ``matrix`` in the base GGUF (and in llama.cpp)."""
    return BASE_EXPERT_TENSOR.format(layer=layer, matrix=matrix)


def sidecar_expert_name(layer: int, matrix: str, expert: int) -> str:
    """Name of one expert's 2-D tensor in a sidecar."""
    return SIDECAR_EXPERT_TENSOR.format(layer=layer, matrix=matrix, expert=expert)


def is_expert_tensor(name: str) -> bool:
    """Whether ``name`` is a routed expert's weight: a base 3-D expert tensor or a sidecar expert.

    Shared experts (``ffn_*_shexp``) are dense weights, read every token: not expert tensors here.
    """
    return BASE_NAME_RE.match(name) is not None or SIDECAR_NAME_RE.match(name) is not None


def row_bytes(qtype: QT, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values stored as ``qtype`` (gguf's block size table)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"Expected a row length that is a multiple of {block} for {qtype.name}, got {n_per_row}")
    return n_per_row // block * type_size


class Key:
    """GGUF metadata keys of the bundle (all under ``dymoe.``)."""

    FORMAT_VERSION = "dymoe.format_version"  # uint32
    ROLE = "dymoe.role"  # "base" | "tier" | "calibration"
    BUNDLE_ID = "dymoe.bundle_id"  # hex string shared by every file of one conversion
    BASE_TIER = "dymoe.base_tier"  # tier name of the experts in model.gguf
    TIERS = "dymoe.tiers"  # array of tier names, low -> high precision
    TIER = "dymoe.tier"  # the tier a sidecar holds
    TIER_FILES = "dymoe.tier_files"  # sidecar file names, same order as TIERS
    EXPERT_ALIGNMENT = "dymoe.expert_alignment"  # uint32
    N_LAYER = "dymoe.n_layer"  # uint32
    N_EXPERT = "dymoe.n_expert"  # uint32
    MOE_LAYERS = "dymoe.moe_layers"  # array of layer indices that have experts
    SOURCE_KIND = "dymoe.source.kind"  # "hf-dir" | "hf-repo" | "gguf"
    SOURCE_ID = "dymoe.source.id"  # path or repo id as given
    SOURCE_FINGERPRINT = "dymoe.source.fingerprint"  # sha256 of config + tensor table
    CONVERTER_VERSION = "dymoe.converter_version"
    IMATRIX = "dymoe.imatrix"  # sha256 of the importance matrix used, "" if none
    CHECKSUM_ALGO = "dymoe.checksum.algo"  # "xxh3_64"
    CHECKSUMS = "dymoe.checksums"  # uint64 array: checksum of each tensor's bytes, tensor-table order


class Tier(enum.Enum):
    """Quant types a bundle tier (or the base) may use, with their ggml type."""

    Q2_K = QT.Q2_K
    Q3_K = QT.Q3_K
    Q4_K = QT.Q4_K
    Q5_K = QT.Q5_K
    Q6_K = QT.Q6_K
    Q8_0 = QT.Q8_0
    F16 = QT.F16
    BF16 = QT.BF16
    F32 = QT.F32

    @property
    def ggml_type(self) -> QT:
        return self.value

    @property
    def is_full_precision(self) -> bool:
        return self in (Tier.F16, Tier.BF16, Tier.F32)


# Tiers allowed as sidecars: quantized ones (a full-precision copy would be pointless there).
SIDECAR_TIERS = (Tier.Q2_K, Tier.Q3_K, Tier.Q4_K, Tier.Q5_K, Tier.Q6_K, Tier.Q8_0)
DEFAULT_TIERS = (Tier.Q2_K, Tier.Q4_K, Tier.Q8_0)
DEFAULT_BASE_TIER = Tier.Q4_K

# Bits per weight, used only to order tiers from low to high precision.
_BITS = {Tier.Q2_K: 2.625, Tier.Q3_K: 3.4375, Tier.Q4_K: 4.5, Tier.Q5_K: 5.5, Tier.Q6_K: 6.5625,
         Tier.Q8_0: 8.5, Tier.F16: 16, Tier.BF16: 16, Tier.F32: 32}


def tier_bits(tier: Tier) -> float:
    """Nominal bits per weight of a tier."""
    return _BITS[tier]


def parse_tier(name: str) -> Tier:
    """``"q4_k"`` -> ``Tier.Q4_K``; a clear error for anything else."""
    key = name.strip().upper()
    try:
        return Tier[key]
    except KeyError:
        valid = ", ".join(t.name for t in Tier)
        raise DymoeError(f"Expected a tier, one of {valid}; got {name!r}") from None


def parse_tiers(spec: str | list[str] | tuple[str, ...]) -> tuple[Tier, ...]:
    """Parse ``"Q2_K,Q4_K,Q8_0"`` into tiers sorted low -> high precision, checking each is a sidecar tier."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    tiers = [parse_tier(n) for n in names if n.strip()]
    if not tiers:
        raise DymoeError("Expected at least one tier in --tiers, got none")
    for t in tiers:
        if t not in SIDECAR_TIERS:
            valid = ", ".join(s.name for s in SIDECAR_TIERS)
            raise DymoeError(f"Expected sidecar tiers among {valid}; got {t.name}")
    if len(set(tiers)) != len(tiers):
        raise DymoeError(f"Expected distinct tiers, got {spec!r}")
    return tuple(sorted(tiers, key=tier_bits))


def sidecar_file(tier: Tier) -> str:
    """File name of the sidecar holding ``tier``."""
    return SIDECAR_TEMPLATE.format(tier=tier.name)


def aligned(n: int, alignment: int = EXPERT_ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment
