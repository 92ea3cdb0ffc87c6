"""The server's live numbers: JSON for ``/stats`` and Prometheus' text format for ``/metrics``."""

from __future__ import annotations

import math
from typing import Any

from dymoe_gguf.runtime.session import Timings

# (name, type, help, where the value is: ("controller", key) or ("total" | "last", Timings attribute))
_METRICS: tuple[tuple[str, str, str, tuple[str, str]], ...] = (
    ("resident_expert_bytes", "gauge", "Expert bytes resident in memory now (mincore).",
     ("controller", "resident_expert_bytes")),
    ("max_resident_expert_bytes", "gauge", "Highest resident expert bytes the pager measured.",
     ("controller", "max_resident_expert_bytes")),
    ("budget_bytes", "gauge", "Memory budget for resident expert bytes (+Inf: unlimited).",
     ("controller", "budget_bytes")),
    ("hit_rate", "gauge", "Share of selected experts already resident when selected.", ("controller", "hit_rate")),
    ("lookahead_recall", "gauge", "Share of the next layer's selected experts that look-ahead predicted.",
     ("controller", "lookahead_recall")),
    ("bytes_read_total", "counter", "Bytes read from storage by the server since the model was opened.",
     ("controller", "bytes_read")),
    ("tokens_total", "counter", "Tokens the model processed (prompt and generated).", ("controller", "tokens")),
    ("tier_changes_total", "counter", "Changes of planned expert tier.", ("controller", "tier_changes")),
    ("requests_total", "counter", "Completions served.", ("total", "requests")),
    ("prompt_tokens_total", "counter", "Prompt tokens evaluated.", ("total", "prompt_tokens")),
    ("prompt_seconds_total", "counter", "Seconds spent evaluating prompts.", ("total", "prompt_seconds")),
    ("generated_tokens_total", "counter", "Tokens generated.", ("total", "generated_tokens")),
    ("generation_seconds_total", "counter", "Seconds spent generating.", ("total", "generation_seconds")),
    ("prompt_tokens_per_second", "gauge", "Prompt speed of the last request.", ("last", "prompt_tps")),
    ("generation_tokens_per_second", "gauge", "Generation speed of the last request.", ("last", "generation_tps")),
)
PREFIX = "dymoe_"


def stats_json(alias: str, controller: dict[str, Any], total: Timings, last: Timings | None) -> dict[str, Any]:
    """The ``/stats`` document: the model's name, server timings and the controller's stats."""
    return {"model": alias, "requests": {"total": total.to_dict(), "last": None if last is None else last.to_dict()},
            "controller": controller}


def _fmt(value: Any) -> str:
    if value is None:
        return "NaN"
    v = float(value)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def prometheus(alias: str, controller: dict[str, Any], total: Timings, last: Timings | None) -> str:
    """Prometheus text exposition (version 0.0.4) of the controller's and the server's numbers."""
    sources = {"controller": controller, "total": total, "last": last}
    lines = [f"# HELP {PREFIX}info The model served and how its experts are handled.",
             f"# TYPE {PREFIX}info gauge",
             f'{PREFIX}info{{model="{_label(alias)}",mode="{_label(controller.get("mode"))}",'
             f'policy="{_label(controller.get("policy"))}"}} 1']
    for name, kind, text, (src, key) in _METRICS:
        obj = sources[src]
        if isinstance(obj, dict):
            value = obj.get(key)
        else:
            value = getattr(obj, key) if obj is not None else None
        if name == "budget_bytes" and value is None:
            value = math.inf
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {_fmt(value)}"]
    return "\n".join(lines) + "\n"


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
