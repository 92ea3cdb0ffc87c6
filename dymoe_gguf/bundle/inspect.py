"""``dymoe-gguf inspect``: what a bundle holds, what it needs in memory, and whether it is valid.

Validation reads headers only (the index, ``calibration.gguf``): milliseconds to a second. With
``verify`` every tensor is also checked against its stored checksum, which reads the whole bundle.
"""

from __future__ import annotations

from pathlib import Path

from dymoe_gguf.bundle import memory
from dymoe_gguf.bundle.format import CALIBRATION_FILE
from dymoe_gguf.bundle.index import BundleIndex
from dymoe_gguf.util import human_bytes


def inspect_bundle(path: Path, verify: bool = False) -> dict:
    """Open (and so validate) the bundle; return its summary."""
    from dymoe_gguf.quality.profile import load_profile

    index = BundleIndex(path, use_cache=False)  # inspect validates from the files themselves
    summary = index.to_dict()
    prof = load_profile(index)  # validates calibration.gguf against this bundle
    mem = memory.estimate(index)
    hp = index.hparams
    summary |= {
        "top_k": hp["n_expert_used"], "context_length": hp["context_length"], "n_vocab": hp["n_vocab"],
        "chat_template": bool(hp["chat_template"]),
        "calibration": None if prof is None else {"file": CALIBRATION_FILE, "tokens": prof.tokens, "text": prof.text},
        "memory": mem.to_dict(),
        "checksums": index.checksum_algo,
    }
    if verify:
        from dymoe_gguf.bundle.verify import verify_bundle

        summary["verify"] = verify_bundle(index).to_dict()
    return summary


def render(summary: dict) -> str:
    """Plain-text report of :func:`inspect_bundle`'s summary."""
    mem = summary["memory"]
    cal = summary["calibration"]
    lines = [
        f"bundle   {summary['path']}  (id {summary['bundle_id'][:12]}, valid)",
        f"model    {summary['arch']}, {summary['n_layer']} layers, {summary['n_expert']} experts (top-"
        f"{summary['top_k']}), MoE layers {summary['moe_layers'][0]}..{summary['moe_layers'][-1]}, context "
        f"{summary['context_length']}, vocabulary {summary['n_vocab']}",
        f"tiers    base {summary['base_tier']}; sidecars {', '.join(summary['tiers'])}; "
        f"alignment {summary['alignment']} B; strided layers: {'yes' if summary['strided_layers'] else 'no'}",
        f"chat     template {'present' if summary['chat_template'] else 'absent (chat needs --chat-format)'}",
        "calibration " + (f"present ({cal['tokens']} tokens of {cal['text'] or 'unnamed text'})" if cal
                          else "absent (run `dymoe-gguf calibrate` for importance-seeded tiers)"),
        f"memory   dense {human_bytes(mem['dense_bytes'])}; KV cache {human_bytes(mem['kv_bytes'])} at context "
        f"{mem['n_ctx']}; expert working set {human_bytes(mem['working_set_bytes'])} (one layer, a batch of "
        f"{mem['n_batch']}, lowest tier)",
        f"         minimum RAM {human_bytes(mem['minimum_bytes'])}; comfortable RAM "
        f"{human_bytes(mem['comfortable_bytes'])} (every expert at the base tier resident)",
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
    if "verify" in summary:
        v = summary["verify"]
        lines.append(f"verified {v['tensors']} tensors in {v['files']} files ({human_bytes(v['bytes'])}, "
                     f"{v['seconds']:.1f}s): every checksum matches")
    elif summary["checksums"]:
        lines.append(f"checksums {summary['checksums']} per tensor (check them with --verify)")
    else:
        lines.append("checksums none (converted by an older version: --verify cannot check this bundle)")
    return "\n".join(lines)
