"""Rendering a bench result: report.md, result.json and the plots (pure functions of the result).

The first line of the report says whether the runs were capped, the second whether storage reads were
throttled (and to what), so a number is never read without its conditions.
"""

from __future__ import annotations

import json
from pathlib import Path

from dymoe_gguf.bench import tables
from dymoe_gguf.bench.compare import projection
from dymoe_gguf.bench.tables import fmt, runs_at, times
from dymoe_gguf.bench.throttle import STORAGE, fmt_limits, fmt_rate
from dymoe_gguf.bench.timing import ratio

MiB = 1 << 20
__all__ = ["projection", "render_markdown", "write_all", "cap_line", "throttle_line", "unthrottled"]


def cap_line(result: dict) -> str:
    if result["capped"]:
        return (f"Capped: every configuration ran in its own memory cgroup limited to "
                f"{result['cap_bytes'] / MiB:.0f} MiB (anonymous memory + page cache), "
                f"{100 * result['cap_shares'][0]:.0f}% of the Q4_K model.")
    return (f"**UNCAPPED** — no memory cap could be set ({result.get('cap_reason')}); "
            "every ratio below is uncapped, not under memory pressure.")


def _asked(result: dict) -> bool:
    return bool(result.get("read_bps") or result.get("read_iops"))


def unthrottled(result: dict) -> bool:
    """A read throttle was asked for (``--read-bps`` / ``--read-iops`` / ``--storage``) but could not be set."""
    return _asked(result) and not (result.get("throttle") or {}).get("throttled")


def throttle_line(result: dict) -> str | None:
    """The storage read throttle, or why there is none; None when not asked for."""
    t = result.get("throttle")
    if not _asked(result) or not t:
        return None
    limits = fmt_limits(result.get("read_bps"), result.get("read_iops"))
    prof = STORAGE.get(result.get("storage") or "")
    what = f"{limits}" + (f", the '{result['storage']}' profile: {prof.desc}" if prof else "")
    if not t.get("throttled"):
        return (f"**UNTHROTTLED** — storage reads could not be throttled to {what} ({t.get('reason')}); every result "
                "below ran at this machine's own storage speed.")
    devs = ", ".join(f"{d['device']} ({d['dev']})" for d in t["devices"])
    line = (f"Throttled: storage reads throttled to {what} ({t['mechanism']}) on {devs}: every configuration's "
            "process read the model through a cgroup with that limit (emulated slower storage; page-cache hits are "
            "not limited).")
    for key, unit in (("probe", "bps"), ("probe_iops", "iops")):
        p = t.get(key)
        if p and p.get(unit):
            got = fmt_rate(p["bps"]) if unit == "bps" else f"{p['iops']:.0f} IOPS"
            line += (f" Probe: {p['bytes'] / 1e6:.0f} MB read cold " + ("sequentially" if unit == "bps" else
                                                                        f"in {p['reads']} random 4 KiB reads")
                     + f" in {p['seconds']:.2f} s = {got}" + (f" ({p['note']})" if p.get("note") else "") + ".")
    return line


def header(result: dict) -> list[str]:
    m = result["machine"]
    ra = ", ".join(f"{d} {kb} KiB" for d, kb in m["read_ahead_kb"].items()) or "n/a"
    md = m.get("model_device")
    thr = throttle_line(result)
    models = result.get("models") or {}
    return [
        cap_line(result), *([thr] if thr else []), "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"{m['system']} {m['kernel']}; page size {m['page_size']} B",
        f"- storage read-ahead (read_ahead_kb): {ra}"
        + (f"; the model's device {md['device']}: {md['read_ahead_kb']} KiB" if md else ""),
        f"- cap: {result['cap_bytes'] / MiB:.0f} MiB"
        + (f" (sweep: {', '.join(f'{100 * s:.0f}%' for s in result['cap_shares'][1:])} of the Q4_K model)"
           if len(result["cap_shares"]) > 1 else ""),
        *(f"- model: {d}" for d in (models.values() if models else [result["model_desc"]])),
        f"- Q4_K model.gguf {result['q4k_model_bytes'] / MiB:.0f} MiB ({result['q4k_expert_bytes'] / MiB:.0f} MiB "
        f"experts, {result['non_expert_bytes'] / MiB:.0f} MiB other); dymoe expert budget = cap − non-expert weights "
        f"− {result['runtime_allowance'] / MiB:.0f} MiB runtime allowance",
        f"- llama-cpp-python {m['llama_cpp_python']} ({'patched' if result['patched_build'] else 'stock'} build); "
        f"{result['threads']} threads; prompt {result['prompt_tokens']} tokens; TPOT = median of "
        f"{result['tokens']} decode steps; cold page cache before every configuration",
    ]


def headline_table(result: dict) -> list[str]:
    """Baseline, tuned stock, dymoe (runtime defaults) and, when it ran, dymoe with skip."""
    h = result["headline"]
    lab = "" if result["capped"] else " (uncapped)"
    mib = 1 / MiB
    cols = [("", h.get("dymoe_config") or "dymoe")]
    if h.get("dymoe_skip_config"):
        cols.append(("_skip", h["dymoe_skip_config"]))
    head = "| | stock Q4_K repack off (baseline) | stock tuned (+MADV_RANDOM) | " + " | ".join(
        f"{name} | baseline / {name}{lab} | tuned / {name}{lab}" for _, name in cols) + " |"
    rows = [head, "|---|" + "---:|" * (2 + 3 * len(cols))]
    br = h.get("bound_ratios") or {}
    tpot = [fmt(h["baseline_tpot_s"], ".1f", 1000), fmt(h["tuned_tpot_s"], ".1f", 1000)]
    ttft = [fmt(h["baseline_ttft_s"]), fmt(h["tuned_ttft_s"])]
    bpt = [fmt(h["baseline_bytes_per_token"], ".1f", mib), fmt(h["tuned_bytes_per_token"], ".1f", mib)]
    bound = [times(br.get("stock-q4k")), times(br.get("stock-q4k-tuned"))]
    cb, us = ["—", "—"], ["—", "—"]
    for sx, _ in cols:
        tpot += [fmt(h[f"dymoe_tpot_s{sx}"], ".1f", 1000), f"**{times(h[f'tpot_ratio{sx}'])}**",
                 f"**{times(h[f'tpot_ratio_tuned{sx}'])}**"]
        ttft += [fmt(h[f"dymoe_ttft_s{sx}"]), f"**{times(h[f'ttft_ratio{sx}'])}**",
                 times(h.get(f"ttft_ratio_tuned{sx}"))]
        d = h[f"dymoe_bytes_per_token{sx}"]
        bpt += [fmt(d, ".1f", mib), times(ratio(h["baseline_bytes_per_token"], d)),
                times(ratio(h["tuned_bytes_per_token"], d))]
        bound += [times(h.get(f"bound_ratio{sx}")), "", ""]
        cb += [fmt(h.get(f"callback_share{sx}"), ".1%"), "", ""]
        us += [fmt(h.get(f"callback_s_per_layer_token{sx}"), ".0f", 1e6), "", ""]
    rows += ["| TPOT (ms) | " + " | ".join(tpot) + " |", "| TTFT (s) | " + " | ".join(ttft) + " |",
             "| read from storage per token (MiB) | " + " | ".join(bpt) + " |",
             "| TPOT ÷ physical bound | " + " | ".join(bound) + " |",
             "| controller callback, share of decode time | " + " | ".join(cb) + " |",
             f"| hot path ({h.get('hot_path') or '—'}), µs per MoE layer per token | " + " | ".join(us) + " |"]
    return rows


def skip_caveat(result: dict) -> str | None:
    """Skip's speed (synthetic model) and its quality (trained model) may come from very different skip rates."""
    h = result["headline"]
    run = next((r for r in runs_at(result) if r["name"] == h.get("dymoe_skip_config")), None)
    q = next((r for r in (result.get("quality") or {}).get("rows", []) if "skip" in r["name"] and r.get("ok")), None)
    if run is None:
        return None
    fast = tables.skipped_share(run, result)
    return (f"Skip caveat: the skip threshold dropped {fmt(fast, '.0%')} of the routed expert slots on the synthetic "
            f"model (speed rows) but {fmt(q and q.get('skipped_share'), '.0%')} on the trained model (quality rows); "
            "the skip rows' speed-up comes at the synthetic model's rate, their quality cost at the trained model's.")


def targets(result: dict) -> list[str]:
    """The issues' targets, for dymoe (runtime defaults) and, when it ran, its skip variant."""
    h = result["headline"]
    q = result.get("quality") or {}
    rows = [r for r in q.get("rows", []) if r.get("ok")]
    q2 = next((r for r in rows if r["name"] == "uniform Q2_K"), None)
    dq = {"": next((r for r in rows if r["name"].startswith("dymoe") and "skip" not in r["name"]), None),
          "_skip": next((r for r in rows if r["name"].startswith("dymoe") and "skip" in r["name"]), None)}
    sfx = [""] + (["_skip"] if h.get("dymoe_skip_config") else [])

    def said(ok: bool) -> str:
        return "reached" if ok else "not reached"

    def cells(fn) -> str:  # noqa: ANN001
        return " | ".join(fn(s) for s in sfx)

    def cmp(key: str, lim: float, ge: bool = True):  # noqa: ANN202
        return lambda s: "—" if h.get(key + s) is None else \
            f"{h[key + s]:.2f}× ({said(h[key + s] >= lim if ge else h[key + s] <= lim)})"

    out = ["| target | " + " | ".join([h.get("dymoe_config") or "dymoe"] + ([h["dymoe_skip_config"]]
                                     if len(sfx) > 1 else [])) + " |", "|---|" + "---:|" * len(sfx)]
    out.append("| TPOT ≥ 10× faster than stock repack-off | " + cells(cmp("tpot_ratio", 10)) + " |")
    out.append("| TPOT ≥ 5× faster than tuned stock | " + cells(cmp("tpot_ratio_tuned", 5)) + " |")
    out.append("| TTFT ≥ 3× faster | " + cells(cmp("ttft_ratio", 3)) + " |")
    out.append("| TPOT ≤ 1.5× the physical bound | " + cells(cmp("bound_ratio", 1.5, ge=False)) + " |")
    out.append("| bytes read per token ≤ 1/5 of stock repack-off | " + cells(
        lambda s: "—" if h["bytes_per_token_ratio" + s] is None else
        f"{h['bytes_per_token_ratio' + s]:.3f} ({said(h['bytes_per_token_ratio' + s] <= 0.2)})") + " |")
    out.append("| KL (trained model) lower than uniform Q2_K | " + cells(
        lambda s: "—" if not (dq[s] and q2 and dq[s]["kl"] is not None) else
        f"{dq[s]['kl']:.4f} vs {q2['kl']:.4f} ({said(dq[s]['kl'] < q2['kl'])})") + " |")
    out.append("| top-1 (trained model) ≥ 97% | " + cells(
        lambda s: "—" if not (dq[s] and dq[s]["top1"] is not None) else
        f"{dq[s]['top1']:.2%} ({said(dq[s]['top1'] >= 0.97)})") + " |")
    return out


def render_markdown(result: dict) -> str:
    """The whole report; its first line says whether the runs were capped, the next one the read throttle."""
    primary = (result.get("routings") or [None])[0]
    lines = header(result)
    lines += ["", "## Headline" + ("" if result["capped"] else " (uncapped)")
              + (" (unthrottled)" if unthrottled(result) else "") + (f" — {primary} routing" if primary else ""),
              ""] + headline_table(result)
    bl = tables.bound_line(result) if result.get("read_bandwidth") is not None else None
    caveat = skip_caveat(result)
    lines += [""] + [x for x in (bl, caveat) if x]
    lines += ["", "## Targets", ""] + targets(result)
    mt = tables.models_table(result)
    if mt:
        lines += ["", "## Realistic and random routing", ""] + mt
    rt = tables.routing_table(result)
    if rt:
        lines += ["", "## Routing statistics of the synthetic models", "",
                  "calibrate on data/calibration.txt (8 chunks of 256 tokens) and the controller's next-layer "
                  "look-ahead recall on the same text. The trained model (models/tiny-moe, 8 experts top-2) "
                  "measures 0.40 / 0.66 / 0.63 / 0.71 normalised entropy (0.10 / 0.49 / 0.45 / 0.56 above its "
                  "floor), transition 0.65 / 0.81 / 0.69 and look-ahead recall 0.92 the same way "
                  "(scripts/bench_routing.py, docs/BENCH.md).", ""] + rt
    for r in result.get("routings") or [None]:
        for share in result["cap_shares"] if r == primary else result["cap_shares"][:1]:
            lines += ["", f"## All configurations at cap {100 * share:.0f}% of the Q4_K model "
                          f"({share * result['q4k_model_bytes'] / MiB:.0f} MiB)" + (f", {r} routing" if r else ""),
                      ""] + tables.runs_table(result, share, r)
    lines += ["", "## Quality", ""] + tables.quality_table(result)
    sw = tables.sweep_tables(result)
    if sw:
        lines += ["", "## Sweeps", ""] + sw
    lines += ["", "## Projection to other devices", ""] + tables.projection_table(result)
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    lines += ["", "TPOT × / TTFT × = stock Q4_K repack-off (baseline) time ÷ this configuration's, same cap, same "
                  "model, same run. ÷ bound = TPOT ÷ (compute floor + bytes read per token ÷ measured read "
                  "bandwidth). callback = the controller's eval-callback time ÷ decode time. TTFT = open the model + "
                  "prompt + first token, cold page cache. Killed for memory = the kernel's OOM killer ended it under "
                  "the cap; crashed = it died by a signal of its own (e.g. SIGSEGV): results, not failures of the "
                  "benchmark."
              + (f" Storage reads throttled to {fmt_limits(result.get('read_bps'), result.get('read_iops'))}: TTFT and "
                 "TPOT include waiting for the throttled reads (page-cache hits are not throttled)." if _asked(result)
                 and not unthrottled(result) else "")]
    return "\n".join(lines) + "\n"


def write_all(result: dict, out: Path) -> dict[str, Path]:
    """result.json, report.md and the plots in ``out``."""
    from dymoe_gguf.bench.plots import plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(render_markdown(result))
    pngs = plot(result, out)
    files = {"json": out / "result.json", "markdown": out / "report.md"} | {p.stem: p for p in pngs}
    result["files"] = {k: str(v) for k, v in files.items()}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return files
