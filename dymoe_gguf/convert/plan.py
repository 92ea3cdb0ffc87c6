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

# llama.cpp's own fallbacks (llama-quant.cpp) when a row length is not a multiple of the block size.
_FALLBACK = {QT.Q2_K: QT.IQ4_NL, QT.Q3_K: QT.IQ4_NL, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1,
             QT.Q6_K: QT.Q8_0, QT.Q8_0: QT.F16, QT.IQ4_NL: QT.F16, QT.Q5_0: QT.F16, QT.Q5_1: QT.F16,
             QT.IQ2_XXS: QT.IQ4_NL, QT.IQ2_XS: QT.IQ4_NL, QT.IQ2_S: QT.IQ4_NL, QT.IQ3_XXS: QT.IQ4_NL,
             QT.IQ3_S: QT.IQ4_NL, QT.IQ1_S: QT.IQ4_NL, QT.IQ1_M: QT.IQ4_NL, QT.IQ4_XS: QT.IQ4_NL,
             QT.TQ1_0: QT.IQ4_NL, QT.TQ2_0: QT.IQ4_NL, QT.Q4_0: QT.F16, QT.Q4_1: QT.F16, QT.MXFP4: QT.F16}
# Types a weight may be stored in (llama-quantize's choices): ggml quantizes them and llama.cpp's CPU
# backend multiplies and looks up rows with them. Q8_1/Q8_K (activation types only), the integer
# types and F64 are not weight types.
WEIGHT_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K,
                QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ1_S, QT.IQ1_M, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS,
                QT.IQ3_S, QT.IQ4_NL, QT.IQ4_XS, QT.TQ1_0, QT.TQ2_0, QT.MXFP4)
# ggml_quantize_requires_imatrix (ggml.c): quantizing these without an importance matrix aborts.
NEEDS_IMATRIX = (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ1_S)
_ALWAYS_F32 = re.compile(r"(_norm|\.bias$|ffn_gate_inp|exp_probs_b|rope_freqs)")  # norms, biases, routers
_FULL = (QT.F32, QT.F16, QT.BF16)


def type_bits(qtype: QT) -> float:
    """Bits per weight of a ggml type (gguf's block size table)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block


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
    reuse: bool = False  # experts: copy the source's own bytes (a quantized source of this very type)

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
    warnings: tuple[str, ...] = field(default_factory=tuple)
    file_sizes: tuple[int, ...] | None = None  # exact sizes, once the headers are known (run.py)

    @property
    def base(self) -> FilePlan:
        return self.files[0]

    @property
    def total_bytes(self) -> int:
        """Exact bytes of the bundle when the headers are known; else its tensor data alone."""
        if self.file_sizes is not None:
            return sum(self.file_sizes)
        return sum(f.data_bytes for f in self.files)

    def to_dict(self) -> dict:
        return {
            "base_tier": self.base_tier.name,
            "tiers": [t.name for t in self.tiers],
            "files": [{
                "name": f.name, "role": f.role, "tier": f.tier.name, "n_tensors": len(f.tensors),
                "bytes": f.data_bytes if self.file_sizes is None else self.file_sizes[i],
                "types": _type_counts(f),
            } for i, f in enumerate(self.files)],
            "total_bytes": self.total_bytes,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
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
        qtype = getattr(QT, tname.strip().upper(), None)
        if qtype not in WEIGHT_TYPES:
            valid = ", ".join(q.name for q in WEIGHT_TYPES)
            what = "is not a type llama.cpp can store weights in" if qtype is not None else "is not a ggml type"
            raise DymoeError(f"--tensor-type {spec!r}: {tname.strip()!r} {what}; expected one of {valid}")
        if not pattern:
            raise DymoeError(f"Expected --tensor-type PATTERN=TYPE with a non-empty PATTERN, got {spec!r}")
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
              overrides: list[tuple[re.Pattern[str], QT]] | None = None, reuse_source: bool = True) -> ConvertPlan:
    """Decide every output tensor's type and size.

    Overrides apply to non-expert matrices only: norms, routers, biases and 1-D tensors stay as
    they are. Experts of a quantized GGUF source are copied byte for byte into every file whose type
    is the source's own (``reuse_source``), and re-quantized from their dequantized values otherwise.
    """
    overrides = overrides or []
    notes: list[str] = []
    warnings: list[str] = []
    fallbacks: dict[tuple[str, str], int] = {}
    applied, kept = [0] * len(overrides), [0] * len(overrides)
    above: dict[tuple[str, str], int] = {}
    reused: dict[str, set[str]] = {}

    def choose(shape: tuple[int, ...], wanted: QT) -> tuple[QT, QT | None]:
        got = fit_type(wanted, shape[-1])
        if got != wanted:
            key = (f"{wanted.name} -> {got.name}", f"rows of {shape[-1]} values")
            fallbacks[key] = fallbacks.get(key, 0) + 1
            return got, wanted
        return got, None

    def non_expert_type(t: SourceTensor) -> QT:
        default = t.raw[0] if t.raw is not None else _default_type(t.name, len(t.shape), base_tier)
        hit = next((i for i, (rx, _q) in enumerate(overrides) if rx.search(t.name)), None)
        if hit is None:
            return default
        if len(t.shape) == 1 or _ALWAYS_F32.search(t.name):
            kept[hit] += 1
            return default
        applied[hit] += 1
        wanted = overrides[hit][1]
        if t.load is None and t.raw is not None and wanted != t.raw[0]:
            raise DymoeError(f"Cannot retype {t.name}: the source stores it as {t.raw[0].name}, "
                             "which cannot be dequantized")
        return wanted

    def expert_plan(t: SourceTensor, file: str, tier: Tier, shape: tuple[int, ...]) -> tuple[QT, QT | None, bool]:
        qtype, fell = choose(shape, tier.ggml_type)
        src = t.raw_expert[0] if t.raw_expert is not None else None
        if src is not None and src not in _FULL and type_bits(qtype) > type_bits(src):
            key = (f"{tier.name} ({type_bits(qtype):.2f} bits)", f"{src.name} ({type_bits(src):.2f} bits)")
            above[key] = above.get(key, 0) + 1
        reuse = reuse_source and src == qtype
        if reuse:
            reused.setdefault(qtype.name, set()).add(file)
        return qtype, fell, reuse

    base: list[TensorPlan] = []
    for t in source.tensors:
        if t.is_expert:
            qtype, fell, reuse = expert_plan(t, BASE_FILE, base_tier, t.shape)
        else:
            qtype, fell = choose(t.shape, non_expert_type(t))
            reuse = False
        base.append(TensorPlan(t.name, t.shape, qtype, tensor_bytes(qtype, t.shape), t, fell, reuse=reuse))
    files = [FilePlan(BASE_FILE, "base", base_tier, tuple(base))]
    for tier in tiers:
        side: list[TensorPlan] = []
        for t in source.tensors:
            if not t.is_expert:
                continue
            shape2 = t.shape[1:]
            qtype, fell, reuse = expert_plan(t, sidecar_file(tier), tier, shape2)
            for e in range(t.shape[0]):
                name = sidecar_expert_name(t.layer, t.matrix, e)
                side.append(TensorPlan(name, shape2, qtype, tensor_bytes(qtype, shape2), t, fell, e, reuse))
        files.append(FilePlan(sidecar_file(tier), "tier", tier, tuple(side)))
    for (change, why), n in sorted(fallbacks.items()):
        notes.append(f"fallback {change} for {n} tensor(s): {why} (the type's block size does not divide it)")
    for (rx, q), n, k in zip(overrides, applied, kept):
        spec = f"--tensor-type '{rx.pattern}={q.name}'"
        if n == 0:
            warnings.append(f"{spec} retypes no tensor" + (f" (the {k} it matches are norms, routers, biases or "
                                                           "1-D, which are never retyped)" if k else ""))
        else:
            notes.append(f"{spec} applies to {n} tensor(s)" + (f"; {k} more it matches (norms, routers, biases, "
                                                               "1-D) keep their type" if k else ""))
    for qname, where in sorted(reused.items()):
        notes.append(f"experts stored as {qname} in the source are copied byte for byte into "
                     f"{', '.join(sorted(where))} (--requantize re-encodes them instead)")
    for (tier, src), n in sorted(above.items()):
        warnings.append(f"tier {tier} is above the source's {src} for {n} expert tensor(s): it re-encodes "
                        "already rounded weights and adds bytes, not precision (convert from the original "
                        "model, or drop the tier)")
    return ConvertPlan(base_tier, tiers, tuple(files), tuple(notes), tuple(warnings))


def describe(plan: ConvertPlan) -> str:
    """Human-readable plan for ``--dry-run``."""
    from dymoe_gguf.util import human_bytes

    lines = [f"base tier {plan.base_tier.name}; tiers {', '.join(t.name for t in plan.tiers)}"]
    for i, f in enumerate(plan.files):
        types = ", ".join(f"{k}×{v}" for k, v in sorted(_type_counts(f).items()))
        size = f.data_bytes if plan.file_sizes is None else plan.file_sizes[i]
        lines.append(f"  {f.name:<22} {len(f.tensors):>6} tensors {human_bytes(size):>10}  [{types}]")
    dense: dict[str, int] = {}
    for t in plan.base.tensors:
        if not t.source.is_expert:
            kind = "matrices" if len(t.shape) > 1 and not _ALWAYS_F32.search(t.name) else "norms/routers/biases"
            dense[f"{t.qtype.name} {kind}"] = dense.get(f"{t.qtype.name} {kind}", 0) + 1
    lines.append("  non-expert tensors: " + ", ".join(f"{n} {k}" for k, n in sorted(dense.items())))
    what = "total" if plan.file_sizes is not None else "tensor data (headers not counted)"
    lines.append(f"  {what} {human_bytes(plan.total_bytes)}")
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"  warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
