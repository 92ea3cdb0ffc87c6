"""Models the benchmark runs: synthetic OLMoE-shaped MoEs (speed, memory) and the trained model (quality).

Synthetic: :func:`dymoe_gguf.synth.write_synthetic` writes an HF checkpoint with real OLMoE shapes
(d=2048, expert ff 1024, 64 experts, top-8; layers configurable; random weights) and one of two
routings (:data:`ROUTING`): ``realistic`` (the default: load skew and next-layer look-ahead recall set
to what the trained model measures, see :data:`dymoe_gguf.synth.REALISTIC`) or ``random`` (the
original random model: near one-hot gates, the hidden state turned over by every layer). The
product's own converter turns it into bundles:

* ``q4k``  base Q4_K, tiers Q2_K/Q4_K/Q8_0 — what dymoe runs, and stock's uniform Q4_K model.gguf;
* ``q2k``  base Q2_K (one Q2_K sidecar) — stock's uniform Q2_K model.gguf;
* ``q8``   base Q8_0 (one Q8_0 sidecar) — stock's uniform Q8_0 model.gguf.

Everything is cached under ``~/.cache/dymoe-gguf/bench/<hash of the config>/`` (override with
``DYMOE_BENCH_CACHE``); the HF checkpoint is deleted once the bundles asked for exist (it is about
0.8 GB per layer and is regenerated from the same seed if a later run needs another bundle). Writing
it needs about 1.6 GB of RAM per layer (weights are generated in float32).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dymoe_gguf.bundle.format import BASE_FILE, Tier
from dymoe_gguf.synth import RANDOM, REALISTIC, SynthConfig

# bundle key -> (base tier, sidecar tiers)
BUNDLES: dict[str, tuple[Tier, tuple[Tier, ...]]] = {
    "q4k": (Tier.Q4_K, (Tier.Q2_K, Tier.Q4_K, Tier.Q8_0)),
    "q2k": (Tier.Q2_K, (Tier.Q2_K,)),
    "q8": (Tier.Q8_0, (Tier.Q8_0,)),
}
UNIFORM = {"Q4_K": "q4k", "Q2_K": "q2k", "Q8_0": "q8"}  # stock uniform tier -> bundle holding its model.gguf
ROUTING: dict[str, dict] = {"realistic": REALISTIC, "random": RANDOM}  # routing -> SynthConfig knobs


@dataclass(frozen=True)
class BenchModel:
    """Shape of the synthetic model (defaults: OLMoE-1B-7B's expert shapes)."""

    n_layer: int = 4
    d: int = 2048
    ff: int = 1024
    n_expert: int = 64
    top_k: int = 8
    n_head: int = 16
    vocab: int = 4096  # small: keeps the non-expert part (embeddings, output) small
    seed: int = 0
    routing: str = "realistic"  # a key of ROUTING

    def __post_init__(self) -> None:
        if self.routing not in ROUTING:
            raise ValueError(f"Expected routing {' or '.join(ROUTING)}, got {self.routing!r}")

    def synth(self) -> SynthConfig:
        return SynthConfig(arch="olmoe", n_layer=self.n_layer, d=self.d, ff=self.ff, n_expert=self.n_expert,
                           top_k=self.top_k, n_head=self.n_head, n_head_kv=self.n_head, vocab=self.vocab,
                           dtype="float16", seed=self.seed, shards=max(1, self.n_layer), **ROUTING[self.routing])

    def key(self) -> str:
        d = asdict(self)
        if d.pop("routing") == "random":  # the random model keeps the cache key it had before routings
            d["skew"] = RANDOM["skew"]
        else:
            d["routing"] = ROUTING[self.routing]
        blob = json.dumps({"model": d, "v": 1}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        knobs = ", ".join(f"{k} {v}" for k, v in ROUTING[self.routing].items())
        return (f"synthetic OLMoE-shape, {self.routing} routing: {self.n_layer} layers, {self.n_expert} experts "
                f"top-{self.top_k}, d={self.d}, expert ff {self.ff}, vocab {self.vocab} ({knobs})")


def cache_root() -> Path:
    env = os.environ.get("DYMOE_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dymoe-gguf" / "bench"


def bundle_path(model: BenchModel, key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / model.key() / f"{key}.dymoe"


def ensure_bundles(model: BenchModel, keys: list[str], *, root: Path | None = None, threads: int | None = None,
                   log: Callable[[str], None] = lambda s: None, progress: bool = False) -> dict[str, Path]:
    """Generate and convert what is missing; returns bundle key -> bundle directory.

    ``progress``: tqdm bars (generating weights, converting) on stderr — the first run's slow part."""
    from dymoe_gguf.convert import convert
    from dymoe_gguf.synth import write_synthetic

    base = (root or cache_root()) / model.key()
    base.mkdir(parents=True, exist_ok=True)
    (base / "model.json").write_text(json.dumps(asdict(model), indent=2))
    out = {k: bundle_path(model, k, root) for k in keys}
    missing = [k for k, p in out.items() if not (p / BASE_FILE).is_file()]
    hf = base / "hf"
    if missing:
        if not (hf / "config.json").is_file():
            log(f"writing {model.describe()} to {hf}")
            write_synthetic(hf, model.synth(), force=True, progress=progress)
        for k in missing:
            base_tier, tiers = BUNDLES[k]
            log(f"converting {k}: base {base_tier.name}, tiers {','.join(t.name for t in tiers)}")
            convert(hf, out[k], base_tier=base_tier, tiers=tiers, threads=threads, force=True, progress=progress)
    shutil.rmtree(hf, ignore_errors=True)  # regenerated bit-identically (seeded) if ever needed again
    return out


def model_files(bundle: Path, stock: bool) -> list[Path]:
    """Files a configuration reads: stock maps only model.gguf; dymoe also the sidecars."""
    bundle = Path(bundle)
    if stock:
        return [bundle / BASE_FILE]
    return sorted(p for p in bundle.glob("*.gguf"))


# ---------------------------------------------------------------------------- the trained model (quality)
TRAINED_DIRS = ("models/tiny-moe",)


def find_trained(repo_root: Path | None = None) -> Path | None:
    """The shipped trained model's HF directory, if it has been trained (config + safetensors)."""
    roots = [repo_root] if repo_root else [Path.cwd(), Path(__file__).resolve().parents[2]]
    for r in roots:
        for d in TRAINED_DIRS:
            p = r / d
            if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
                return p
    return None


def ensure_trained_bundle(src: Path, *, root: Path | None = None, threads: int | None = None,
                          log: Callable[[str], None] = lambda s: None, progress: bool = False) -> Path:
    """The trained model converted with a full-precision (F16) base — the reference — and Q2_K/Q4_K/Q8_0 tiers."""
    from dymoe_gguf.convert import convert

    h = hashlib.sha256()
    for p in sorted(src.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    out = (root or cache_root()) / f"trained-{h.hexdigest()[:16]}" / "model.dymoe"
    if not (out / BASE_FILE).is_file():
        log(f"converting the trained model {src} (base F16, tiers Q2_K,Q4_K,Q8_0)")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(src, out, base_tier=Tier.F16, tiers=(Tier.Q2_K, Tier.Q4_K, Tier.Q8_0), threads=threads, force=True,
                progress=progress)
    return out
