"""``dymoe-gguf inspect``: what a bundle holds, and whether it is valid."""

from __future__ import annotations

from pathlib import Path

from dymoe_gguf.bundle.index import BundleIndex
from dymoe_gguf.util import human_bytes


def inspect_bundle(path: Path) -> dict:
    """Open (and so validate) the bundle; return its summary."""
    return BundleIndex(path, use_cache=False).to_dict()  # inspect validates from the files themselves


def render(summary: dict) -> str:
    """Plain-text report of :func:`inspect_bundle`'s summary."""
    lines = [
        f"bundle   {summary['path']}  (id {summary['bundle_id'][:12]}, valid)",
        f"model    {summary['arch']}, {summary['n_layer']} layers, {summary['n_expert']} experts, "
        f"MoE layers {summary['moe_layers'][0]}..{summary['moe_layers'][-1]}",
        f"tiers    base {summary['base_tier']}; sidecars {', '.join(summary['tiers'])}; "
        f"alignment {summary['alignment']} B; strided layers: {'yes' if summary['strided_layers'] else 'no'}",
        "files",
    ]
    lines += [f"  {name:<22} {human_bytes(size):>10}" for name, size in summary["files"].items()]
    lines.append("expert bytes per tier")
    lines += [f"  {t:<6} {human_bytes(b):>10}" for t, b in summary["expert_bytes_per_tier"].items()]
    lines.append("expert bytes per layer (" + ", ".join(summary["tiers"]) + ")")
    per = summary["expert_bytes_per_layer"]
    for layer in summary["moe_layers"]:
        lines.append(f"  layer {layer:<3} " + "  ".join(f"{human_bytes(per[t][layer]):>10}" for t in summary["tiers"]))
    lines.append(f"source   {summary['source']['kind']} {summary['source']['id']}")
    return "\n".join(lines)
