"""Runtime options, validated once (``Controller.open``, ``run``, ``eval`` share them)."""

from __future__ import annotations

import difflib
import enum
import logging
from dataclasses import dataclass, field, fields, replace

import numpy as np
import psutil

from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.bundle.format import parse_tier
from dymoe_gguf.bundle.memory import working_set_bytes
from dymoe_gguf.errors import DymoeError, RuntimeConfigError
from dymoe_gguf.runtime.decide.depth import DEPTH_KINDS, NOT_RESIDENT
from dymoe_gguf.runtime.decide.planner import BASE
from dymoe_gguf.util import human_bytes


class Policy(str, enum.Enum):
    """How tiers are chosen (``uniform`` takes a tier: ``uniform:Q2_K``)."""

    DYMOE = "dymoe"  # importance + depth + budget, re-planned as routing changes
    STATIC = "static"  # from the calibration profile, frozen
    OFF = "off"  # plain llama.cpp: no callback, nothing swapped
    OBSERVE = "observe"  # record routing, change nothing
    MANUAL = "manual"  # tiers set by Controller.set_tiers
    UNIFORM = "uniform"  # every expert at one tier

    def __str__(self) -> str:
        return self.value


class Mode(str, enum.Enum):
    """How views are applied: one tier per layer (stock llama.cpp) or per expert (patched build)."""

    AUTO = "auto"
    PER_LAYER = "per-layer"
    PER_EXPERT = "per-expert"

    def __str__(self) -> str:
        return self.value


# What users may type (the CLI's choices and the error messages).
POLICY_CHOICES = tuple(p.value for p in Policy if p is not Policy.UNIFORM) + ("uniform:<TIER>",)
MODE_CHOICES = tuple(m.value for m in Mode)


@dataclass(frozen=True)
class RuntimeConfig:
    """How the controller decides and applies tiers."""

    policy: Policy = Policy.DYMOE
    tier: str | None = None  # the tier of policy uniform (uniform:Q2_K -> "Q2_K")
    budget: int | None = None  # resident expert bytes; None = unlimited
    auto_budget: bool = False  # budget "auto": derived from available RAM when the model is loaded
    lookahead: int = 1  # layers predicted ahead (0 = off)
    # prefetch for a layer only while its measured look-ahead recall (moving average over recent
    # tokens) is at least this: a wrong guess costs a read and may evict a kept expert (0 = always)
    lookahead_min_recall: float = 0.6
    skip_threshold: float = 0.0  # drop selected experts whose gate weight is below this (0 = off)
    depth: str = "cosine"  # r(l) schedule: cosine | linear | constant
    r_max: float = 1.0  # share of experts above the lowest tier in the first layer
    r_min: float = 0.25  # ... and in the last (the budget, not the cap, usually binds)
    pins: dict[int, str] = field(default_factory=dict)  # layer -> tier name ("none" = not resident)
    half_life: float = 32.0  # importance EMA half-life in tokens
    promote_margin: float = 0.25  # hysteresis: a challenger needs (1+margin)x the incumbent's score
    reallocate_every: int = 16  # tokens between allocator runs
    mode: Mode = Mode.AUTO
    measure_hits: bool = True  # mincore check of selected experts (per-layer hit rates)

    @property
    def uniform_tier(self) -> str | None:
        """The tier of policy ``uniform:<TIER>``, else None."""
        return self.tier if self.policy is Policy.UNIFORM else None

    @property
    def policy_name(self) -> str:
        """The policy as the user writes it (``uniform:Q2_K``)."""
        return f"uniform:{self.tier}" if self.policy is Policy.UNIFORM else self.policy.value


def parse_budget(spec: str | int | None) -> int | None:
    """'2GiB', '512MiB', '50%' (of total RAM), an int, or None/'none' -> bytes or None ('auto' is
    resolved when the model is loaded: :func:`dymoe_gguf.bundle.memory.auto_budget`)."""
    from dymoe_gguf.util import parse_size

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "unlimited")):
        return None
    if isinstance(spec, str) and spec.strip().endswith("%"):
        try:
            share = float(spec.strip()[:-1])
        except ValueError:
            raise RuntimeConfigError(f"Expected a memory budget such as 2GiB or 50%, got {spec!r}") from None
        if not 0 < share <= 100:
            raise RuntimeConfigError(f"Expected a budget share in (0, 100]%, got {spec!r}")
        return int(psutil.virtual_memory().total * share / 100)
    try:
        return parse_size(spec)
    except DymoeError as exc:
        raise RuntimeConfigError(str(exc).replace("a size", "a memory budget")) from None


_ALIASES = {"budget": "memory_budget", "skip": "skip_threshold", "min_recall": "lookahead_min_recall"}


def _check_names(kw: dict) -> None:
    """Unknown option names get a one-line error with the likely intended name."""
    known = {f.name for f in fields(RuntimeConfig)} - {"policy", "tier", "budget"}
    for name in sorted(set(kw) - known):
        hint = _ALIASES.get(name) or next(iter(difflib.get_close_matches(name, [*known, "memory_budget"], 1)), None)
        raise RuntimeConfigError(f"Unknown runtime option {name!r}" + (f": did you mean {hint!r}?" if hint else
                                 f"; expected memory_budget, policy or one of {', '.join(sorted(known))}"))


def make_config(policy: str = "dymoe", memory_budget: str | int | None = None, **kw) -> RuntimeConfig:
    """Validated :class:`RuntimeConfig` from user-facing options."""
    _check_names(kw)
    name = str(policy).strip().lower()
    kind, _, tier = name.partition(":")
    if kind not in POLICY_CHOICES[:-1] + (Policy.UNIFORM.value,) or bool(tier) != (kind == Policy.UNIFORM.value):
        raise RuntimeConfigError(f"Unknown policy {name!r}: expected one of {', '.join(POLICY_CHOICES)}")
    mode = str(kw.pop("mode", Mode.AUTO.value))
    if mode not in MODE_CHOICES:
        raise RuntimeConfigError(f"Expected mode {', '.join(MODE_CHOICES)}, got {mode!r}")
    auto = isinstance(memory_budget, str) and memory_budget.strip().lower() == "auto"
    cfg = RuntimeConfig(policy=Policy(kind), tier=tier.upper() or None, mode=Mode(mode),
                        budget=None if auto else parse_budget(memory_budget), auto_budget=auto, **kw)
    if cfg.lookahead < 0 or cfg.lookahead > 8:
        raise RuntimeConfigError(f"Expected --lookahead between 0 and 8, got {cfg.lookahead}")
    if not 0 <= cfg.lookahead_min_recall <= 1:
        raise RuntimeConfigError(f"Expected lookahead_min_recall in [0, 1], got {cfg.lookahead_min_recall}")
    if not 0 <= cfg.skip_threshold < 1:
        raise RuntimeConfigError(f"Expected a skip threshold in [0, 1), got {cfg.skip_threshold}")
    if cfg.depth not in DEPTH_KINDS:
        raise RuntimeConfigError(f"Expected depth schedule {', '.join(DEPTH_KINDS)}, got {cfg.depth!r}")
    if cfg.reallocate_every < 1:
        raise RuntimeConfigError("Expected reallocate_every >= 1")
    return cfg


def check_against(cfg: RuntimeConfig, index: BundleIndex) -> None:
    """Raise if ``cfg`` names tiers or layers ``index``'s bundle lacks."""
    if cfg.uniform_tier is not None and parse_tier(cfg.uniform_tier) not in index.tiers:
        raise RuntimeConfigError(f"Tier {cfg.uniform_tier} is not in this bundle (tiers: "
                                 f"{', '.join(t.name for t in index.tiers)})")
    resolve_pins(cfg, index)


def resolve_pins(cfg: RuntimeConfig, index: BundleIndex) -> dict[int, int]:
    """``cfg.pins`` ({layer: tier name or "none"}) as {MoE layer index: tier index or NOT_RESIDENT}."""
    moe_index = {layer: i for i, layer in enumerate(index.moe_layers)}
    pins = {}
    for layer, name in cfg.pins.items():
        if layer not in moe_index:
            raise RuntimeConfigError(f"Cannot pin layer {layer}: MoE layers are {list(index.moe_layers)}")
        if str(name).lower() == "none":
            pins[moe_index[layer]] = NOT_RESIDENT
            continue
        tier = parse_tier(str(name))
        if tier not in index.tiers:
            raise RuntimeConfigError(f"Cannot pin layer {layer} to {tier.name}: not a tier of this bundle")
        pins[moe_index[layer]] = index.tiers.index(tier)
    return pins


def manual_tiers(index: BundleIndex, tiers: dict[tuple[int, int], str]) -> np.ndarray:
    """``{(layer, expert): "Q2_K" | "base"}`` as tier indices ``[n_moe_layers, n_expert]`` (BASE elsewhere)."""
    out = np.full((len(index.moe_layers), index.n_expert), BASE, dtype=np.int16)
    moe_index = {layer: i for i, layer in enumerate(index.moe_layers)}
    for (layer, e), name in tiers.items():
        if layer not in moe_index or not 0 <= e < index.n_expert:
            raise RuntimeConfigError(f"No expert {e} in MoE layer {layer}: MoE layers are {list(index.moe_layers)}, "
                                     f"experts 0..{index.n_expert - 1}")
        out[moe_index[layer], e] = BASE if name == "base" else index.tiers.index(parse_tier(name))
    return out


def check_budget_floor(budget: int | None, index: BundleIndex, n_tokens: int) -> None:
    """Refuse a budget below the minimum working set of an ``n_tokens`` batch (:mod:`..bundle.memory`)."""
    floor = working_set_bytes(index, n_tokens)
    if budget is not None and budget < floor:
        raise RuntimeConfigError(
            f"Memory budget {human_bytes(budget)} is below the minimum working set, {human_bytes(floor)} "
            f"({floor} bytes): one MoE layer of a {n_tokens}-token batch can select that many expert bytes at "
            f"the lowest tier. Raise the budget or lower n_ubatch")


def resolve_auto_budget(cfg: RuntimeConfig, index: BundleIndex, llama_kwargs: dict) -> RuntimeConfig:
    """``cfg`` with budget "auto" turned into bytes for the Llama about to be built (its n_ctx, n_batch)."""
    from dymoe_gguf.bundle.memory import auto_budget

    if not cfg.auto_budget:
        return cfg
    n_ctx = int(llama_kwargs.get("n_ctx") or index.hparams.get("context_length") or 512)
    n_batch = min(int(llama_kwargs.get("n_ubatch") or 512), int(llama_kwargs.get("n_batch") or 512), n_ctx)
    budget = auto_budget(index, n_ctx, n_batch, psutil.virtual_memory().available)
    logging.getLogger(__name__).info("budget auto: %s of resident experts", human_bytes(budget))
    return replace(cfg, budget=budget, auto_budget=False)
