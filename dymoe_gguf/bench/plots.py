"""PNG plots of a bench result: TPOT against the memory cap, bytes read per token, the Pareto front."""

from __future__ import annotations

from pathlib import Path

from dymoe_gguf.bench.compare import WARM
from dymoe_gguf.bench.tables import runs_at
from dymoe_gguf.bench.throttle import fmt_limits

MiB = 1 << 20


def _thr_title(result: dict) -> str:
    bps, iops = result.get("read_bps"), result.get("read_iops")
    if not (bps or iops):
        return ""
    ok = (result.get("throttle") or {}).get("throttled")
    return f", reads throttled to {fmt_limits(bps, iops)}" if ok else " (UNTHROTTLED)"


def plot(result: dict, out: Path) -> list[Path]:
    """tpot_vs_budget.png, bytes_per_token.png and, after ``--sweeps``, pareto.png (no matplotlib: none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    primary = (result.get("routings") or [None])[0]
    files = []
    fig, ax = plt.subplots(figsize=(10, 5.5))
    names = [n for n in result["configs"] if n != WARM]
    cmap = plt.get_cmap("tab20")
    for i, n in enumerate(names):
        pts = sorted((r["cap_bytes"] / MiB, 1000 * r["tpot_s"]) for r in result["runs"]
                     if r["name"] == n and r.get("ok") and r.get("cap_bytes") and r.get("model") == primary)
        if pts:
            ax.plot(*zip(*pts), marker="s" if n.startswith("stock") else "o", label=n, color=cmap(i % 20),
                    linestyle="--" if n.startswith("stock") else "-")
    ax.set_xlabel("memory cap (MiB, anonymous + page cache)" if result["capped"] else "nominal cap (MiB, UNCAPPED)")
    ax.set_ylabel("TPOT (ms, median)")
    ax.set_yscale("log")
    ax.set_title(("" if result["capped"] else "UNCAPPED — ") + f"TPOT against memory budget ({primary} routing)"
                 + _thr_title(result))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    files.append(_save(fig, plt, out / "tpot_vs_budget.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in runs_at(result) if r.get("ok") and r["name"] != WARM]
    ax.barh([r["name"] for r in rows], [r["bytes_per_token"] / MiB for r in rows],
            color=["tab:gray" if r["name"].startswith("stock") else "tab:blue" for r in rows])
    ax.set_xlabel("MiB read from storage per decoded token")
    ax.set_title(f"Bytes read per token at cap {result['cap_bytes'] / MiB:.0f} MiB"
                 + ("" if result["capped"] else " (UNCAPPED)") + _thr_title(result))
    ax.invert_yaxis()
    fig.tight_layout()
    files.append(_save(fig, plt, out / "bytes_per_token.png"))

    sw = result.get("sweeps") or {}
    pts = [r for r in sw.get("rows", []) if r.get("tpot_s") is not None and r.get("kl") is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        labels = sorted({r["label"] for r in pts})
        for i, lab in enumerate(labels):
            mine = [r for r in pts if r["label"] == lab]
            marker = "s" if (mine[0].get("options") or {}).get("mode") == "per-layer" else "o"  # squares: per-layer
            ax.scatter([1000 * r["tpot_s"] for r in mine], [r["kl"] for r in mine], label=lab, color=cmap(i % 20),
                       marker=marker)
            for r in mine:
                ax.annotate(f"{100 * r['share']:.0f}%", (1000 * r["tpot_s"], r["kl"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        front = sorted((1000 * r["tpot_s"], r["kl"]) for r in pts if r.get("pareto"))
        if front:
            ax.plot(*zip(*front), color="black", linewidth=1, label="Pareto front")
        ax.set_xlabel("TPOT (ms, realistic synthetic model, capped)")
        ax.set_ylabel("KL divergence (trained model)")
        ax.set_yscale("log")
        ax.set_title("Quality against speed at budgets of " + ", ".join(f"{100 * s:.0f}%" for s in sw["shares"])
                     + " of the Q4_K expert bytes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, plt, out / "pareto.png"))
    return files


def _save(fig, plt, path: Path) -> Path:  # noqa: ANN001 - matplotlib objects
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
