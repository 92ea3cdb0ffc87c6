"""Rendering a bench result: markdown, JSON, PNG plots, and the device projection (pure functions of the result).

The projection is arithmetic, not a measurement: for each configuration at the headline cap,
``projected TPOT = compute + I/O`` where compute is the warm, uncapped stock TPOT measured in the same
run on this machine (not scaled to the device's CPU) and I/O is the larger of
``bytes read per token / sequential bandwidth`` and ``major faults per token x 4 KiB random-read
latency`` (a fault is a synchronous small read; prefetched bulk reads are bandwidth-bound).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dymoe_gguf.bench.cgroup import fmt_rate as _rate

MiB = 1 << 20

# name -> (sequential read bytes/s, latency of one synchronous 4 KiB random read, s). Assumptions, stated.
DEVICES: dict[str, tuple[float, float]] = {
    "Raspberry Pi 5, SD card (~90 MB/s)": (90e6, 0.5e-3),
    "Raspberry Pi 5, NVMe (~800 MB/s)": (800e6, 0.1e-3),
    "Jetson Orin, NVMe (~2 GB/s)": (2e9, 0.1e-3),
    "Mac mini SSD (~3 GB/s)": (3e9, 0.06e-3),
}


def _fmt(x: float | None, spec: str = ".2f", scale: float = 1.0, none: str = "—") -> str:
    return none if x is None else format(x * scale, spec)


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}×"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _at(result: dict, share: float | None = None) -> list[dict]:
    share = result["cap_shares"][0] if share is None else share
    return [r for r in result["runs"] if r["cap_share"] == share]


# ---------------------------------------------------------------------------- projection
def projection(result: dict) -> dict[str, Any]:
    """Projected TPOT per device for each configuration that ran at the headline cap."""
    warm = next((r for r in result["runs"] if r["name"] == "stock-q4k-warm" and r.get("ok")), None)
    compute = warm["tpot_s"] if warm else None
    rows = []
    for r in _at(result):
        if not r.get("ok") or r["name"] == "stock-q4k-warm" or compute is None:
            continue
        per = {}
        for dev, (bw, lat) in DEVICES.items():
            io = max(r["bytes_per_token"] / bw, r["major_faults_per_token"] * lat)
            per[dev] = compute + io
        rows.append({"name": r["name"], "bytes_per_token": r["bytes_per_token"],
                     "major_faults_per_token": r["major_faults_per_token"], "tpot_s": per})
    base = next((x for x in rows if x["name"] == "stock-q4k"), None)
    for x in rows:
        x["speedup"] = ({d: base["tpot_s"][d] / x["tpot_s"][d] for d in DEVICES} if base else None)
    return {"label": "PROJECTION (computed, not measured)", "compute_s": compute,
            "devices": {d: {"bandwidth": bw, "latency_4k": lat} for d, (bw, lat) in DEVICES.items()}, "rows": rows}


# ---------------------------------------------------------------------------- markdown
def cap_line(result: dict) -> str:
    if result["capped"]:
        return (f"Capped: every configuration ran in its own memory cgroup limited to "
                f"{result['cap_bytes'] / MiB:.0f} MiB (anonymous memory + page cache), "
                f"{100 * result['cap_shares'][0]:.0f}% of the Q4_K model.")
    return (f"**UNCAPPED** — no memory cap could be set ({result.get('cap_reason')}); "
            "every ratio below is uncapped, not under memory pressure.")


def unthrottled(result: dict) -> bool:
    """A read throttle was asked for (``--read-bps``) but could not be set."""
    return bool(result.get("read_bps")) and not (result.get("throttle") or {}).get("throttled")


def throttle_line(result: dict) -> str | None:
    """The storage read throttle (``--read-bps``), or why there is none; None when not asked for."""
    t = result.get("throttle")
    if not result.get("read_bps") or not t:
        return None
    if not t.get("throttled"):
        return (f"**UNTHROTTLED** — storage reads could not be throttled to {_rate(result['read_bps'])} "
                f"({t.get('reason')}); every result below ran at this machine's own storage speed.")
    devs = ", ".join(f"{d['device']} ({d['dev']})" for d in t["devices"])
    line = (f"Throttled: storage reads throttled to {_rate(result['read_bps'])} ({t['mechanism']}) on {devs}: every "
            "configuration's process read the model through a cgroup with that read limit (emulated slower storage; "
            "page-cache hits are not limited).")
    p = t.get("probe")
    if p and p.get("bps"):
        line += (f" Probe: {p['bytes'] / 1e6:.0f} MB read cold in {p['seconds']:.2f} s = {_rate(p['bps'])}"
                 + (f" ({p['note']})" if p.get("note") else "") + ".")
    return line


def header(result: dict) -> list[str]:
    m = result["machine"]
    ra = ", ".join(f"{d} {kb} KiB" for d, kb in m["read_ahead_kb"].items()) or "n/a"
    md = m.get("model_device")
    thr = throttle_line(result)
    lines = [
        cap_line(result), *([thr] if thr else []), "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"{m['system']} {m['kernel']}; page size {m['page_size']} B",
        f"- storage read-ahead (read_ahead_kb): {ra}"
        + (f"; the model's device {md['device']}: {md['read_ahead_kb']} KiB" if md else ""),
        f"- cap: {result['cap_bytes'] / MiB:.0f} MiB"
        + (f" (sweep: {', '.join(f'{100 * s:.0f}%' for s in result['cap_shares'][1:])} of the Q4_K model)"
           if len(result["cap_shares"]) > 1 else ""),
        f"- model: {result['model_desc']}; Q4_K model.gguf {result['q4k_model_bytes'] / MiB:.0f} MiB "
        f"({result['q4k_expert_bytes'] / MiB:.0f} MiB experts, {result['non_expert_bytes'] / MiB:.0f} MiB other)",
        f"- dymoe expert budget = cap − non-expert weights − {result['runtime_allowance'] / MiB:.0f} MiB runtime "
        "allowance",
        f"- llama-cpp-python {m['llama_cpp_python']} ({'patched' if result['patched_build'] else 'stock'} build); "
        f"{result['threads']} threads; prompt {result['prompt_tokens']} tokens; TPOT = median of "
        f"{result['tokens']} decode steps; cold page cache before every configuration",
    ]
    return lines


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
    tpot = [f"{_fmt(h['baseline_tpot_s'], '.1f', 1000)}", f"{_fmt(h['tuned_tpot_s'], '.1f', 1000)}"]
    ttft = [f"{_fmt(h['baseline_ttft_s'])}", f"{_fmt(h['tuned_ttft_s'])}"]
    bpt = [f"{_fmt(h['baseline_bytes_per_token'], '.1f', mib)}", f"{_fmt(h['tuned_bytes_per_token'], '.1f', mib)}"]
    for sx, _ in cols:
        tpot += [_fmt(h[f"dymoe_tpot_s{sx}"], ".1f", 1000), f"**{_x(h[f'tpot_ratio{sx}'])}**",
                 f"**{_x(h[f'tpot_ratio_tuned{sx}'])}**"]
        ttft += [_fmt(h[f"dymoe_ttft_s{sx}"]), f"**{_x(h[f'ttft_ratio{sx}'])}**", _x(h.get(f"ttft_ratio_tuned{sx}"))]
        d = h[f"dymoe_bytes_per_token{sx}"]
        bpt += [_fmt(d, ".1f", mib), _x(_ratio(h["baseline_bytes_per_token"], d)),
                _x(_ratio(h["tuned_bytes_per_token"], d))]
    rows += ["| TPOT (ms) | " + " | ".join(tpot) + " |", "| TTFT (s) | " + " | ".join(ttft) + " |",
             "| read from storage per token (MiB) | " + " | ".join(bpt) + " |"]
    return rows


def quality_table(result: dict) -> list[str]:
    q = result.get("quality") or {}
    if "rows" not in q:
        return [f"Quality: skipped — {q.get('skipped', 'not run')}."]
    lines = [f"Quality on the trained model ({q['model']}), held-out text, ctx {q['ctx']}"
             + (f", first {q['chunks']} chunks" if q.get("chunks") else "")
             + f"; reference: {q['reference']}"
             + (f"; dymoe budget {100 * q['rel_budget']:.0f}% of the Q4_K expert bytes (the same share as the "
                "speed run)" if q.get("rel_budget") else ""), "",
             "| policy | ppl | KL | top-1 | slots skipped |", "|---|---:|---:|---:|---:|"]
    for r in q["rows"]:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | failed: {r.get('error')} | | | |")
            continue
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {_fmt(r['kl'], '.4f')} | {_fmt(r['top1'], '.2%')} | "
                     f"{_fmt(r.get('skipped_share'), '.1%')} |")
    return lines


def skipped_share(run: dict, result: dict) -> float | None:
    """Share of the routed (token, layer, slot) triples a dymoe run skipped."""
    c = run.get("controller") or {}
    slots = c.get("tokens", 0) * result["model"].get("n_layer", 1) * result["model"].get("top_k", 1)
    return c.get("skipped_slots", 0) / slots if slots else None


def skip_caveat(result: dict) -> str | None:
    """Skip's speed (synthetic model) and its quality (trained model) may come from very different skip rates."""
    h = result["headline"]
    run = next((r for r in _at(result) if r["name"] == h.get("dymoe_skip_config")), None)
    q = next((r for r in (result.get("quality") or {}).get("rows", []) if "skip" in r["name"] and r.get("ok")), None)
    if run is None:
        return None
    fast = skipped_share(run, result)
    return (f"Skip caveat: the skip threshold dropped {_fmt(fast, '.0%')} of the routed expert slots on the synthetic "
            f"model (speed rows) but {_fmt(q and q.get('skipped_share'), '.0%')} on the trained model (quality rows): "
            "the synthetic OLMoE shape has unnormalised top-8-of-64 gate weights, mostly below the threshold, the "
            "trained model renormalised top-2 weights. The skip rows' speed-up is therefore mostly computing fewer "
            "experts, and its quality cost at that rate is not measured here.")


def runs_table(result: dict, share: float) -> list[str]:
    lines = ["| configuration | TTFT s | TPOT ms | TPOT × | TTFT × | MiB read/token | faults/token | "
             "peak RSS MiB | cgroup peak MiB | resident model MiB | result |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in _at(result, share):
        if not r.get("ok"):
            what = ("**killed** (" + (r.get("signal") or "OOM") + ")" if r.get("killed") else
                    "timed out" if r.get("timed_out") else f"failed: {r.get('error', '')[:80]}")
            lines.append(f"| {r['name']} | | | | | | | | {_fmt(r.get('cgroup_peak'), '.0f', 1 / MiB)} | | {what} |")
            continue
        extra = ""
        c = r.get("controller") or {}
        if c:
            extra = f"{c.get('mode')}, hit {_fmt(c.get('hit_rate'), '.0%')}, look-ahead recall " \
                    f"{_fmt(c.get('lookahead_recall'), '.0%')}"
            if c.get("skipped_slots"):
                extra += f", skipped {skipped_share(r, result):.0%} of slots"
        labels = ("" if r["capped"] else " (uncapped)") + (
            " (unthrottled)" if result.get("read_bps") and not r.get("throttled") else "")
        lines.append(
            f"| {r['name']} | {r['ttft_s']:.2f} | {1000 * r['tpot_s']:.1f} | {_x(r.get('tpot_speedup'))} | "
            f"{_x(r.get('ttft_speedup'))} | {r['bytes_per_token'] / MiB:.2f} | {r['major_faults_per_token']:.0f} | "
            f"{r['peak_rss'] / MiB:.0f} | {_fmt(r.get('cgroup_peak'), '.0f', 1 / MiB)} | "
            f"{r['resident_model_bytes'] / MiB:.0f} | ok{'; ' + extra if extra else ''}{labels} |")
    return lines


def projection_table(result: dict) -> list[str]:
    p = result.get("projection") or {}
    if not p.get("rows"):
        return ["Projection: not available (the warm compute-time run did not complete)."]
    devs = list(p["devices"])
    lines = [f"**{p['label']}** — projected TPOT in ms = compute ({1000 * p['compute_s']:.1f} ms: the warm, uncapped "
             "stock TPOT measured here, not scaled to the device's CPU) + max(bytes read per token / bandwidth, "
             "major faults per token × 4 KiB read latency). Device figures are assumptions: "
             + "; ".join(f"{d}: latency {1e3 * v['latency_4k']:.2f} ms" for d, v in p["devices"].items()) + ".", "",
             "| configuration | " + " | ".join(devs) + " |", "|---|" + "---:|" * len(devs)]
    for x in p["rows"]:
        cells = []
        for d in devs:
            s = f"{1000 * x['tpot_s'][d]:.0f}"
            if x.get("speedup") and x["name"] != "stock-q4k":
                s += f" ({x['speedup'][d]:.1f}×)"
            cells.append(s)
        lines.append(f"| {x['name']} | " + " | ".join(cells) + " |")
    return lines


def targets(result: dict) -> list[str]:
    """The issue's targets, for dymoe (runtime defaults) and, when it ran, its skip variant."""
    h = result["headline"]
    q = result.get("quality") or {}
    rows = [r for r in q.get("rows", []) if r.get("ok")]
    q2 = next((r for r in rows if r["name"] == "uniform Q2_K"), None)
    dq = {"": next((r for r in rows if r["name"].startswith("dymoe") and "skip" not in r["name"]), None),
          "_skip": next((r for r in rows if r["name"].startswith("dymoe") and "skip" in r["name"]), None)}
    sfx = [""] + (["_skip"] if h.get("dymoe_skip_config") else [])

    def said(ok: bool) -> str:
        return "reached" if ok else "not reached"

    def cells(fn) -> str:
        return " | ".join(fn(s) for s in sfx)

    def ge(key: str, lim: float):
        return lambda s: "—" if h[key + s] is None else f"{h[key + s]:.1f}× ({said(h[key + s] >= lim)})"

    out = ["| target | " + " | ".join([h.get("dymoe_config") or "dymoe"] + ([h["dymoe_skip_config"]]
                                     if len(sfx) > 1 else [])) + " |", "|---|" + "---:|" * len(sfx)]
    out.append("| TPOT ≥ 10× faster than stock repack-off | " + cells(ge("tpot_ratio", 10)) + " |")
    out.append("| TPOT ≥ 5× faster than tuned stock | " + cells(ge("tpot_ratio_tuned", 5)) + " |")
    out.append("| TTFT ≥ 3× faster | " + cells(ge("ttft_ratio", 3)) + " |")
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
    lines = header(result)
    lines += ["", "## Headline" + ("" if result["capped"] else " (uncapped)")
              + (" (unthrottled)" if unthrottled(result) else ""), ""] + headline_table(result)
    caveat = skip_caveat(result)
    lines += ([""] + [caveat] if caveat else [])
    lines += ["", "## Targets", ""] + targets(result)
    for share in result["cap_shares"]:
        lines += ["", f"## All configurations at cap {100 * share:.0f}% of the Q4_K model "
                      f"({share * result['q4k_model_bytes'] / MiB:.0f} MiB)", ""] + runs_table(result, share)
    lines += ["", "## Quality", ""] + quality_table(result)
    lines += ["", "## Projection to other devices", ""] + projection_table(result)
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    lines += ["", "TPOT × / TTFT × = stock Q4_K repack-off (baseline) time ÷ this configuration's, same cap, same "
                  "run. TTFT = open the model + prompt + first token, cold page cache. Killed = the kernel's OOM "
                  "killer ended it under the cap (a result, not a failure of the benchmark)."
              + (f" Storage reads throttled to {_rate(result['read_bps'])}: TTFT and TPOT include waiting for the "
                 "throttled reads (page-cache hits are not throttled)." if result.get("read_bps")
                 and not unthrottled(result) else "")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def _thr_title(result: dict) -> str:
    if not result.get("read_bps"):
        return ""
    return " (UNTHROTTLED)" if unthrottled(result) else f", reads throttled to {_rate(result['read_bps'])}"


def plot(result: dict, out: Path) -> list[Path]:
    """tpot_vs_budget.png (TPOT against cap, one line per configuration), bytes_per_token.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    fig, ax = plt.subplots(figsize=(10, 5.5))
    names = [n for n in result["configs"] if n != "stock-q4k-warm"]
    cmap = plt.get_cmap("tab20")
    for i, n in enumerate(names):
        pts = sorted((r["cap_bytes"] / MiB, 1000 * r["tpot_s"]) for r in result["runs"]
                     if r["name"] == n and r.get("ok") and r.get("cap_bytes"))
        if pts:
            ax.plot(*zip(*pts), marker="s" if n.startswith("stock") else "o", label=n, color=cmap(i % 20),
                    linestyle="--" if n.startswith("stock") else "-")
    ax.set_xlabel("memory cap (MiB, anonymous + page cache)" if result["capped"] else "nominal cap (MiB, UNCAPPED)")
    ax.set_ylabel("TPOT (ms, median)")
    ax.set_yscale("log")
    ax.set_title(("" if result["capped"] else "UNCAPPED — ") + "TPOT against memory budget" + _thr_title(result))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    p = out / "tpot_vs_budget.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in _at(result) if r.get("ok") and r["name"] != "stock-q4k-warm"]
    ax.barh([r["name"] for r in rows], [r["bytes_per_token"] / MiB for r in rows],
            color=["tab:gray" if r["name"].startswith("stock") else "tab:blue" for r in rows])
    ax.set_xlabel("MiB read from storage per decoded token")
    ax.set_title(f"Bytes read per token at cap {result['cap_bytes'] / MiB:.0f} MiB"
                 + ("" if result["capped"] else " (UNCAPPED)") + _thr_title(result))
    ax.invert_yaxis()
    fig.tight_layout()
    p = out / "bytes_per_token.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


def write_all(result: dict, out: Path) -> dict[str, Path]:
    """result.json, report.md and the plots in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(render_markdown(result))
    pngs = plot(result, out)
    files = {"json": out / "result.json", "markdown": out / "report.md"} | {p.stem: p for p in pngs}
    result["files"] = {k: str(v) for k, v in files.items()}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return files
