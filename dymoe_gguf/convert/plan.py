"""The conversion plan: every output file, every tensor, its type and size — before any work.

``--dry-run`` prints this plan; the writer follows it exactly, so offsets are known up front.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from dymoe_gguf.bundle.format import (
    BASE_FILE,
    EXPERT_ALIGNMENT,
    Tier,
    aligned,
    row_bytes,
    sidecar_expert_name,
    sidecar_file,
)
from dymoe_gguf.converters import Source, SourceTensor
from dymoe_gguf.errors import DymoeError

# llama.cpp's own fallbacks (llama-quant.cpp) when a row length is not a multiple of 256.
_FALLBACK = {QT.Q2_K: QT.IQ4_NL, QT.Q3_K: QT.IQ4_NL, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1,
             QT.Q6_K: QT.Q8_0, QT.Q8_0: QT.F16, QT.IQ4_NL: QT.F16, QT.Q5_0: QT.F16, QT.Q5_1: QT.F16}
_ALWAYS_F32 = re.compile(r"(_norm|\.bias$|ffn_gate_inp)")  # norms, biases, routers


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of one output file."""

    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: QT
    nbytes: int
    source: SourceTensor
    wanted: QT | None = None  # the type asked for, when a fallback replaced it
    expert: int | None = None  # sidecar tensors: which expert of source

    @property
    def n_in(self) -> int:
        return self.shape[-1]


@dataclass(frozen=True)
class FilePlan:
    """One output file: its tensors in order."""

    name: str
    role: str  # "base" | "tier"
    tier: Tier
    tensors: tuple[TensorPlan, ...]

    @property
    def data_bytes(self) -> int:
        return sum(aligned(t.nbytes, EXPERT_ALIGNMENT) for t in self.tensors)


@dataclass(frozen=True)
class ConvertPlan:
    """Everything ``convert`` will write."""

    base_tier: Tier
    tiers: tuple[Tier, ...]
    files: tuple[FilePlan, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def base(self) -> FilePlan:
        return self.files[0]

    @property
    def total_bytes(self) -> int:
        # data plus a generous allowance for headers (token lists of big vocabularies)
        return sum(f.data_bytes for f in self.files) + len(self.files) * 8 * 2**20

    def to_dict(self) -> dict:
        return {
            "base_tier": self.base_tier.name,
            "tiers": [t.name for t in self.tiers],
            "files": [{
                "name": f.name, "role": f.role, "tier": f.tier.name, "n_tensors": len(f.tensors),
                "bytes": f.data_bytes,
                "types": _type_counts(f),
            } for f in self.files],
            "total_bytes": self.total_bytes,
            "notes": list(self.notes),
        }


def _type_counts(f: FilePlan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in f.tensors:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return counts


def tensor_bytes(qtype: QT, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (numpy order) stored as ``qtype``."""
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * row_bytes(qtype, shape[-1])


def fit_type(qtype: QT, n_in: int) -> QT:
    """``qtype`` if rows of ``n_in`` fit it, else llama.cpp's fallback chain."""
    while n_in % GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK.get(qtype, QT.F32)
    return qtype


def parse_overrides(specs: tuple[str, ...] | list[str]) -> list[tuple[re.Pattern[str], QT]]:
    """``["attn_.*=Q4_K", "output=Q6_K"]`` -> compiled (regex, type) pairs; first match wins."""
    out = []
    for spec in specs:
        if "=" not in spec:
            raise DymoeError(f"Expected --tensor-type PATTERN=TYPE, got {spec!r}")
        pattern, _, tname = spec.rpartition("=")
        try:
            qtype = QT[tname.strip().upper()]
        except KeyError:
            raise DymoeError(f"Expected a ggml type name in --tensor-type, got {tname!r}") from None
        try:
            out.append((re.compile(pattern), qtype))
        except re.error as exc:
            raise DymoeError(f"Invalid --tensor-type pattern {pattern!r}: {exc}") from None
    return out


def _default_type(name: str, ndim: int, base_tier: Tier) -> QT:
    if ndim == 1 or _ALWAYS_F32.search(name):
        return QT.F32
    # Non-expert matrices are a small share of an MoE: keep them at high precision.
    return base_tier.ggml_type if base_tier.is_full_precision else QT.Q8_0


def make_plan(source: Source, base_tier: Tier, tiers: tuple[Tier, ...],
              overrides: list[tuple[re.Pattern[str], QT]] | None = None) -> ConvertPlan:
    """Decide every output tensor's type and size."""
    notes: list[str] = []
    fallbacks: dict[tuple[str, str], int] = {}

    def choose(name: str, shape: tuple[int, ...], wanted: QT) -> tuple[QT, QT | None]:
        got = fit_type(wanted, shape[-1])
        if got != wanted:
            key = (f"{wanted.name} -> {got.name}", f"rows of {shape[-1]} values")
            fallbacks[key] = fallbacks.get(key, 0) + 1
            return got, wanted
        return got, None

    base: list[TensorPlan] = []
    for t in source.tensors:
        if t.is_expert:
            wanted = base_tier.ggml_type
        else:
            wanted = next((q for rx, q in overrides or [] if rx.search(t.name)), None) or (
                t.raw[0] if t.raw is not None and t.load is None else _default_type(t.name, len(t.shape), base_tier))
            if t.load is None and t.raw is not None and wanted != t.raw[0]:
                raise DymoeError(f"Cannot retype {t.name}: the source stores it as {t.raw[0].name}")
        qtype, fell = choose(t.name, t.shape, wanted)
        base.append(TensorPlan(t.name, t.shape, qtype, tensor_bytes(qtype, t.shape), t, fell))
    files = [FilePlan(BASE_FILE, "base", base_tier, tuple(base))]
    for tier in tiers:
        side: list[TensorPlan] = []
        for t in source.tensors:
            if not t.is_expert:
                continue
            shape2 = t.shape[1:]
            qtype, fell = choose(t.name, shape2, tier.ggml_type)
            for e in range(t.shape[0]):
                name = sidecar_expert_name(t.layer, t.matrix, e)
                side.append(TensorPlan(name, shape2, qtype, tensor_bytes(qtype, shape2), t, fell, e))
        files.append(FilePlan(sidecar_file(tier), "tier", tier, tuple(side)))
    for (change, why), n in sorted(fallbacks.items()):
        notes.append(f"fallback {change} for {n} tensor(s): {why} (K-quants need multiples of 256)")
    return ConvertPlan(base_tier, tiers, tuple(files), tuple(notes))


def describe(plan: ConvertPlan) -> str:
    """Human-readable plan for ``--dry-run``."""
    from dymoe_gguf.util import human_bytes

    lines = [f"base tier {plan.base_tier.name}; tiers {', '.join(t.name for t in plan.tiers)}"]
    for f in plan.files:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(_type_counts(f).items()))
        lines.append(f"  {f.name:<22} {len(f.tensors):>6} tensors {human_bytes(f.data_bytes):>10}  [{types}]")
    lines.append(f"  total (with headers) {human_bytes(plan.total_bytes)}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
