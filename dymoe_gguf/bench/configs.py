"""What ``dymoe-gguf bench`` runs: the configurations, the options, the storage to emulate.

Each configuration is a worker setting (:mod:`dymoe_gguf.bench.worker`). How stock llama.cpp is set up
(docs/BENCH.md repeats this): every stock configuration loads the bundle's ``model.gguf`` (uniform
experts) with ``llama_cpp.Llama`` on the same build as dymoe, its patch features off (no
``DYMOE_NO_POPULATE``: llama.cpp maps the file with ``MAP_POPULATE`` and reads it all at load, as
stock does), ``use_mmap`` on, from a cold page cache;

* ``stock-*-default``: llama.cpp's defaults, repack on (``use_extra_bufts``: experts copied into
  anonymous memory — killed for memory under a cap, or crashes on CPUs with AMX);
* ``stock-*`` (the baseline): repack off, plain mmap;
* ``stock-*-tuned``: repack off and ``madvise(MADV_RANDOM)`` on every mapping of the model file right
  after load (no fault read-ahead: each fault reads one page, not the device's read_ahead_kb around it)
  — the best a stock user can do without a patch (scripts/bench_stock.py checks it independently);
* ``stock-q4k-warm``: repack off, uncapped, warm cache: the compute floor, not a ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dymoe_gguf.bench.compare import BASELINE, TUNED, WARM
from dymoe_gguf.bench.models import UNIFORM, BenchModel

MiB = 1 << 20
# Memory a process needs besides expert weights, on top of the base model's non-expert tensors:
# Python + numpy + llama-cpp-python, KV cache, compute buffers, logits, the controller's arrays.
# Measured RssAnon on the OLMoE-shape models here: stock worker 28 MiB, dymoe worker 45 MiB; the rest
# is headroom (page tables, kernel memory charged to the cgroup, libraries not yet cached).
RUNTIME_ALLOWANCE = 64 * MiB
SKIP_THRESHOLD = 0.05  # "with skip": drop selected experts whose gate weight is below this

# name -> worker settings (and a description for the report)
CONFIGS: dict[str, dict[str, Any]] = {}
for _tier, _t in UNIFORM.items():
    CONFIGS[f"stock-{_t}-default"] = {"kind": "stock", "tier": _tier, "repack": True,
                                      "desc": f"stock {_tier}, llama.cpp defaults (repack on)"}
    CONFIGS[f"stock-{_t}"] = {"kind": "stock", "tier": _tier, "repack": False,
                              "desc": f"stock {_tier}, repack off" + (" (baseline)" if _tier == "Q4_K" else "")}
    CONFIGS[f"stock-{_t}-tuned"] = {"kind": "stock", "tier": _tier, "repack": False, "madv_random": True,
                                    "desc": f"stock {_tier}, repack off + MADV_RANDOM (tuned)"}
for _mode, _m in (("per-layer", "layer"), ("per-expert", "expert")):
    for _la in (1, 0):
        for _skip in (0.0, SKIP_THRESHOLD):
            _name = f"dymoe-{_m}" + ("" if _la else "-nola") + ("-skip" if _skip else "")
            CONFIGS[_name] = {"kind": "dymoe", "mode": _mode, "lookahead": _la, "skip": _skip,
                              "desc": f"dymoe {_mode}" + (", look-ahead 1" if _la else ", no look-ahead")
                              + (f", skip < {_skip}" if _skip else "")}
CONFIGS[WARM] = {"kind": "stock", "tier": "Q4_K", "repack": False, "warm": True,
                 "desc": "stock Q4_K, repack off, uncapped, warm cache (compute time; not a ratio)"}

QUICK_CONFIGS = [BASELINE, TUNED, "dymoe-expert", WARM]
FULL_CONFIGS = list(CONFIGS)
# The second synthetic model of a full run (the random routing) runs these (look-ahead's effect shows there).
SECOND_MODEL_CONFIGS = [BASELINE, TUNED, "dymoe-expert", "dymoe-expert-nola", "dymoe-layer", WARM]
ROUTINGS = ("realistic", "random")


@dataclass
class BenchOptions:
    """What ``dymoe-gguf bench`` runs."""

    out: Path = Path("bench-out")
    quick: bool = False
    layers: int | None = None  # default: 2 with --quick, else 4
    cap: str = "50%"  # share of the Q4_K model file ("50%", "0.5") or a size ("455MB")
    sweep: tuple[float, ...] | None = None  # extra caps (shares of the Q4_K model) for the TPOT-vs-budget plot
    tokens: int = 64
    prompt_tokens: int = 32
    configs: list[str] | None = None
    threads: int | None = None
    quality: bool = True
    quality_chunks: int | None = None  # default: 16 with --quick, else all
    model: BenchModel | None = None  # default: OLMoE shape with ``layers`` layers
    routing: tuple[str, ...] | None = None  # synthetic routings (first = headline); default realistic (+ random: full)
    timeout: float = 900.0
    allowance: int = RUNTIME_ALLOWANCE
    read_bps: int | str | None = None  # throttle every configuration's storage reads ("90MB": bytes/s); None: off
    read_iops: int | str | None = None  # ... and their read operations per second; None: off
    storage: str | None = None  # a named profile (throttle.STORAGE): its bps/iops unless given explicitly
    sweeps: bool = False  # equal-budget (dymoe/static/uniform) and Pareto runs (bench/sweeps.py)
    progress: bool = False  # tqdm bars while building the models (terminal only)
    cache_root: Path | None = None
    extra: dict = field(default_factory=dict)  # extra worker settings (tests)


def worker_cfg(name: str, spec: dict, bundles: dict[str, Path], budget: int | None, opts: BenchOptions,
               threads: int) -> dict:
    """The worker's JSON config for configuration ``name`` (``spec`` = CONFIGS[name]) on ``bundles``."""
    from dymoe_gguf.bench.models import model_files

    base = {"name": name, "kind": spec["kind"], "tokens": opts.tokens, "prompt_tokens": opts.prompt_tokens,
            "threads": threads, "n_ctx": max(128, opts.prompt_tokens + opts.tokens + 16), "seed": 0}
    if spec["kind"] == "stock":
        b = bundles[UNIFORM[spec["tier"]]]
        files = model_files(b, stock=True)
        base.update({"model": str(files[0]), "files": [str(f) for f in files], "repack": spec.get("repack", False),
                     "madv_random": spec.get("madv_random", False), "drop_cache": not spec.get("warm")})
    else:
        b = bundles["q4k"]
        base.update({"model": str(b), "files": [str(f) for f in model_files(b, stock=False)], "mode": spec["mode"],
                     "lookahead": spec["lookahead"], "skip": spec["skip"], "budget": budget})
    base.update(opts.extra)
    return base
