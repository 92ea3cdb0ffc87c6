"""Markdown tables of a bench result (pure functions of the result dict)."""

from __future__ import annotations

from dymoe_gguf.bench.compare import BASELINE, WARM

MiB = 1 << 20


def fmt(x: float | None, spec: str = ".2f", scale: float = 1.0, none: str = "—") -> str:
    return none if x is None else format(x * scale, spec)


def times(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}×"


def runs_at(result: dict, share: float | None = None, model: str | None = None) -> list[dict]:
    """Runs of one synthetic model (default: the headline's) at one cap share (default: the headline's)."""
    share = result["cap_shares"][0] if share is None else share
    model = (result.get("routings") or [None])[0] if model is None else model
    return [r for r in result["runs"] if r["cap_share"] == share and r.get("model") == model]


def failure(r: dict) -> str:
    """How a run that did not complete ended: killed for memory, crashed, timed out, failed."""
    if r.get("crashed"):
        return f"**crashed: {r.get('signal')}**"
    if r.get("killed"):
        return "**killed for memory** (OOM)" if r.get("oom_kills") else f"**killed** ({r.get('signal')})"
    if r.get("timed_out"):
        return "timed out"
    return f"failed: {(r.get('error') or '')[:80]}"


def skipped_share(run: dict, result: dict) -> float | None:
    """Share of the routed (token, layer, slot) triples a dymoe run skipped."""
    c = run.get("controller") or {}
    slots = c.get("tokens", 0) * result["model"].get("n_layer", 1) * result["model"].get("top_k", 1)
    return c.get("skipped_slots", 0) / slots if slots else None


def runs_table(result: dict, share: float, model: str | None = None) -> list[str]:
    lines = ["| configuration | TTFT s | TPOT ms | TPOT × | TTFT × | ÷ bound | callback | MiB read/token | "
             "faults/token | peak RSS MiB | cgroup peak MiB | resident model MiB | result |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs_at(result, share, model):
        if not r.get("ok"):
            lines.append(f"| {r['name']} | | | | | | | | | | {fmt(r.get('cgroup_peak'), '.0f', 1 / MiB)} | | "
                         f"{failure(r)} |")
            continue
        extra = ""
        c = r.get("controller") or {}
        if c:
            extra = (f"{c.get('mode')}, hit {fmt(c.get('hit_rate'), '.0%')}, look-ahead recall "
                     f"{fmt(c.get('lookahead_recall'), '.0%')} / precision {fmt(c.get('lookahead_precision'), '.0%')}"
                     f", prefetch {({True: 'on', False: 'off'}).get(c.get('prefetch_on'), '—')}, hot path "
                     f"{c.get('hot_path', '—')} {fmt(r.get('callback_s_per_layer_token'), '.0f', 1e6)} µs/layer/token")
            if c.get("skipped_slots"):
                extra += f", skipped {skipped_share(r, result):.0%} of slots"
        labels = ("" if r["capped"] else " (uncapped)") + (
            " (unthrottled)" if (result.get("read_bps") or result.get("read_iops")) and not r.get("throttled") else "")
        lines.append(
            f"| {r['name']} | {r['ttft_s']:.2f} | {1000 * r['tpot_s']:.1f} | {times(r.get('tpot_speedup'))} | "
            f"{times(r.get('ttft_speedup'))} | {times(r.get('bound_ratio'))} | {fmt(r.get('callback_share'), '.0%')} | "
            f"{r['bytes_per_token'] / MiB:.2f} | {r['major_faults_per_token']:.0f} | {r['peak_rss'] / MiB:.0f} | "
            f"{fmt(r.get('cgroup_peak'), '.0f', 1 / MiB)} | {r['resident_model_bytes'] / MiB:.0f} | "
            f"ok{'; ' + extra if extra else ''}{labels} |")
    return lines


def models_table(result: dict) -> list[str]:
    """The headline ratios of each synthetic model side by side (realistic vs random routing)."""
    bm = result.get("by_model") or {}
    if len(bm) < 2:
        return []
    rows = [("dymoe configuration", "dymoe_config", None), ("TPOT × stock repack-off", "tpot_ratio", times),
            ("TPOT × tuned stock", "tpot_ratio_tuned", times), ("TTFT × stock repack-off", "ttft_ratio", times),
            ("TPOT ÷ physical bound", "bound_ratio", times), ("callback share of decode", "callback_share",
                                                              lambda x: fmt(x, ".1%")),
            ("hot path µs per MoE layer per token", "callback_s_per_layer_token", lambda x: fmt(x, ".0f", 1e6)),
            ("look-ahead recall (decode)", "lookahead_recall", lambda x: fmt(x, ".0%")),
            ("hit rate", "hit_rate", lambda x: fmt(x, ".0%"))]
    out = ["| | " + " | ".join(f"{m} routing" for m in bm) + " |", "|---|" + "---:|" * len(bm)]
    for label, key, f in rows:
        out.append(f"| {label} | " + " | ".join((f or str)(h.get(key)) if h.get(key) is not None else "—"
                                                 for h in bm.values()) + " |")
    return out


def routing_table(result: dict) -> list[str]:
    """Routing statistics of each synthetic model (calibrate + the controller's look-ahead recall)."""
    rs = result.get("routing") or {}
    if not rs:
        return []
    out = ["| model | normalised load entropy per layer | above the top-k floor | hottest expert's share | "
           "transition predictability | next-layer look-ahead recall |", "|---|---|---|---|---|---:|"]

    def seq(xs, spec=".2f"):
        return " / ".join("—" if x is None else format(x, spec) for x in xs or [])

    for m, s in rs.items():
        if not s.get("ok", True) or "normalized_entropy" not in s:
            out.append(f"| {m} | failed: {s.get('error')} | | | | |")
            continue
        out.append(f"| {m} | {seq(s['normalized_entropy'])} | {seq(s.get('excess_entropy'))} | "
                   f"{seq(s['top_expert_share'], '.0%')} | {seq(s['transition'][:-1])} | "
                   f"{fmt(s.get('lookahead_recall'), '.3f')} |")
    return out


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
            lines.append(f"| {r['name']} | {failure(r)} | | | |")
            continue
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {fmt(r['kl'], '.4f')} | {fmt(r['top1'], '.2%')} | "
                     f"{fmt(r.get('skipped_share'), '.1%')} |")
    return lines


def sweep_tables(result: dict) -> list[str]:
    """Dynamic vs static vs uniform at equal budgets, and every sweep point with the Pareto front marked."""
    sw = result.get("sweeps")
    if not sw:
        return []
    if "rows" not in sw:
        return [f"Sweeps: skipped — {sw.get('skipped')}."]
    shares = sw["shares"]

    def cell(r: dict | None) -> str:
        if r is None:
            return "—"
        if not r["quality_ok"] or not r["speed_ok"]:
            return f"failed: {(r.get('quality_error') or r.get('speed_error') or '')[:60]}"
        return f"{r['kl']:.4f} / {r['top1']:.2%} / {1000 * r['tpot_s']:.1f}"

    at = {(r["label"], r["share"]): r for r in sw["rows"]}
    out = ["### Dynamic vs static vs uniform at equal budgets", "",
           "KL / top-1 on the trained model / TPOT ms on the realistic synthetic model, budget = share of the Q4_K "
           "expert bytes (speed cap = budget + non-expert weights + runtime allowance; both models calibrated).", "",
           "| policy | " + " | ".join(f"{100 * s:.0f}%" for s in shares) + " |", "|---|" + "---:|" * len(shares)]
    for label in sw["equal_budget"]:
        out.append(f"| {label} | " + " | ".join(cell(at.get((label, s))) for s in shares) + " |")
    out += prefer_table(sw["rows"], shares)
    out += ["", "### Pareto front: TPOT against KL", "",
            "| configuration | budget | TPOT ms | KL | top-1 | hit rate | on the front |",
            "|---|---:|---:|---:|---:|---:|:---:|"]
    for r in sorted(sw["rows"], key=lambda r: (r["tpot_s"] is None, r["tpot_s"] or 0)):
        out.append(f"| {r['label']} | {100 * r['share']:.0f}% | {fmt(r['tpot_s'], '.1f', 1000)} | "
                   f"{fmt(r['kl'], '.4f')} | {fmt(r['top1'], '.2%')} | {fmt(r.get('hit_rate'), '.0%')} | "
                   f"{'●' if r['pareto'] else ''} |")
    return out


def prefer_table(rows: list[dict], shares: list[float]) -> list[str]:
    """The ``prefer`` points side by side: per-expert against per-layer at each budget (KL / TPOT ms)."""
    at = {(r["options"].get("mode"), r["options"].get("prefer"), r["share"]): r for r in rows
          if (r.get("options") or {}).get("prefer") and set(r["options"]) == {"mode", "prefer"}}
    prefs = list(dict.fromkeys(p for _, p, _ in at))
    if not prefs:
        return []

    def cell(r: dict | None) -> str:
        if r is None or not (r["quality_ok"] and r["speed_ok"]):
            return "—" if r is None else "failed"
        return f"{r['kl']:.4f} / {1000 * r['tpot_s']:.1f}"

    out = ["", "### `prefer` in both modes", "", "KL / TPOT ms at each budget (same runs as below).", "",
           "| prefer | mode | " + " | ".join(f"{100 * s:.0f}%" for s in shares) + " |",
           "|---|---|" + "---:|" * len(shares)]
    for p in prefs:
        for mode in ("per-expert", "per-layer"):
            if any((mode, p, s) in at for s in shares):
                out.append(f"| {p} | {mode} | " + " | ".join(cell(at.get((mode, p, s))) for s in shares) + " |")
    return out


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
            if x.get("speedup") and x["name"] != BASELINE:
                s += f" ({x['speedup'][d]:.1f}×)"
            cells.append(s)
        lines.append(f"| {x['name']} | " + " | ".join(cells) + " |")
    return lines


def bound_line(result: dict) -> str | None:
    """How the physical bound was measured (read bandwidth, compute floor)."""
    bw = result.get("read_bandwidth") or {}
    warm = next((r for r in runs_at(result) if r["name"] == WARM and r.get("ok")), None)
    if not bw.get("bps") or warm is None:
        return (f"Physical bound: not available ({bw.get('note') or 'no read bandwidth'}"
                f"{'' if warm else '; no warm compute-floor run'}).")
    return (f"Physical bound = compute floor ({1000 * warm['tpot_s']:.1f} ms: warm uncapped stock TPOT) + bytes read "
            f"per token ÷ {bw['bps'] / 1e6:.0f} MB/s (a cold sequential read of {bw['bytes'] / MiB:.0f} MiB of the "
            "Q4_K model inside the same cap" + (" and throttle" if (result.get("throttle") or {}).get("throttled")
                                                else "")
            + ", measured in this run). ÷ bound = TPOT ÷ bound (target ≤ 1.5×).")

