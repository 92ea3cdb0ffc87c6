"""Commands about the machine and speed: ``doctor``, ``bench``."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from dymoe_gguf.bench.throttle import STORAGE
from dymoe_gguf.cli._app import CONTEXT, cli, emit, errors
from dymoe_gguf.errors import DymoeError


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@errors
def doctor(as_json: bool) -> None:
    """Report the llama.cpp build, patch status, page size, memory cap and paging calls available."""
    from dymoe_gguf.doctor import diagnose, render

    info = diagnose()
    emit(info, as_json, render(info))


def _bench_model(bundle: Path, budget: str | None, n_prompt: int, n_gen: int, reps: int, compare_stock: bool,
                 threads: int | None, as_json: bool) -> None:
    """``bench -m``: llama-bench's table for the user's bundle."""
    from dymoe_gguf.bench.user import bench_bundle, render

    res = bench_bundle(bundle, budget=budget, n_prompt=n_prompt, n_gen=n_gen, reps=reps, compare_stock=compare_stock,
                       threads=threads, log=lambda s: click.echo(s, err=True))
    emit(res, as_json, render(res))


@cli.command(context_settings=CONTEXT)
@click.option("-m", "--model", "bundle", type=click.Path(path_type=Path), default=None, metavar="BUNDLE",
              help="Benchmark this bundle like llama-bench (prompt and generation tokens/s) instead of the "
                   "synthetic stock-vs-dymoe comparison.")
@click.option("--budget", default=None, metavar="SIZE", help="With -m: resident expert bytes [default: unlimited].")
@click.option("-p", "--n-prompt", type=click.IntRange(0, 1 << 16), default=512, show_default=True,
              help="With -m: prompt tokens (ppN test; 0 = skip).")
@click.option("-n", "--n-gen", type=click.IntRange(0, 1 << 16), default=128, show_default=True,
              help="With -m: generated tokens (tgN test; 0 = skip).")
@click.option("-r", "--repetitions", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="With -m: repetitions of each test (mean ± stddev).")
@click.option("--compare-stock", is_flag=True, help="With -m: also stock llama.cpp (repack off) on the bundle's base.")
@click.option("--quick", is_flag=True, help="Small run (2 layers; baseline, tuned stock, dymoe per-expert): < 5 min.")
@click.option("--layers", type=click.IntRange(1, 64), help="Layers of the synthetic model [default: 4, quick: 2].")
@click.option("--cap", default="50%", show_default=True,
              help="Memory cap per configuration: a share of the Q4_K model (50%, 0.5) or a size (455MB).")
@click.option("--sweep", default=None, metavar="SHARES",
              help="Extra caps as shares of the Q4_K model for the TPOT-vs-budget plot, e.g. 0.35,0.75 "
                   "[default: 0.35,0.75; none with --quick].")
@click.option("--routing", type=click.Choice(["realistic", "random", "both"]), default=None,
              help="Routing of the synthetic model: realistic (like the trained model's), random, or both "
                   "[default: both; quick: realistic].")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
              help="Directory for result.json, report.md and the plots.")
@click.option("--tokens", type=click.IntRange(64, 100_000), default=64, show_default=True,
              help="Decode steps per configuration (TPOT is their median).")
@click.option("--configs", default=None, help="Comma-separated configuration names [default: all; quick: 4].")
@click.option("-t", "--threads", type=click.IntRange(1, 512), help="Threads [default: all cores].")
@click.option("--no-quality", is_flag=True, help="Skip the quality columns (trained model).")
@click.option("--sweeps", is_flag=True,
              help="Also dymoe vs static vs uniform at equal budgets and the TPOT-vs-KL Pareto front (slow).")
@click.option("--storage", type=click.Choice(sorted(STORAGE)), default=None,
              help="Emulate this storage: " + "; ".join(f"{k} = {v.desc}" for k, v in sorted(STORAGE.items()))
              + " (a read throttle; --read-bps/--read-iops override its parts).")
@click.option("--read-bps", "read_bps", default=None, metavar="RATE",
              help="Throttle every configuration's storage reads to RATE bytes/s (90MB ~ a Raspberry Pi SD card, "
                   "800MB ~ NVMe) with a blkio / io.max cgroup on the disk holding the models [default: off].")
@click.option("--read-iops", "read_iops", default=None, metavar="IOPS",
              help="Throttle every configuration's storage reads to IOPS read operations per second (2k ~ an SD "
                   "card: each 4 KiB page fault then costs ~0.5 ms) [default: off].")
@click.option("--json", "as_json", is_flag=True, help="Print the headline as JSON.")
@click.pass_context
@errors
def bench(ctx: click.Context, bundle: Path | None, budget: str | None, n_prompt: int, n_gen: int, repetitions: int,
          compare_stock: bool, quick: bool, layers: int | None, cap: str, sweep: str | None, routing: str | None,
          out: Path, tokens: int, configs: str | None, threads: int | None, no_quality: bool, sweeps: bool,
          storage: str | None, read_bps: str | None, read_iops: str | None, as_json: bool) -> None:
    """Stock llama.cpp against dymoe under a memory cap (cgroup), cold cache, one run; ratios and a report.

    With -m BUNDLE: prompt and generation tokens/s of your own bundle, llama-bench style."""
    from dymoe_gguf.bench.run import BenchOptions, run_bench
    from dymoe_gguf.bench.throttle import parse_iops, parse_rate

    synthetic_only = ("quick", "layers", "cap", "sweep", "routing", "out", "tokens", "configs", "no_quality",
                      "sweeps", "storage", "read_bps", "read_iops")
    model_only = ("budget", "n_prompt", "n_gen", "repetitions", "compare_stock")
    given = {k for k in synthetic_only + model_only
             if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if bundle is not None:
        if given & set(synthetic_only):
            opt = "--" + sorted(given & set(synthetic_only))[0].replace("_", "-")
            raise click.UsageError(f"{opt} is an option of the synthetic benchmark, not of -m BUNDLE")
        return _bench_model(bundle, budget, n_prompt, n_gen, repetitions, compare_stock, threads, as_json)
    if given & set(model_only):
        opt = "--" + sorted(given & set(model_only))[0].replace("_", "-")
        raise click.UsageError(f"{opt} needs -m BUNDLE")
    for flag, value, parse in (("--read-bps", read_bps, parse_rate), ("--read-iops", read_iops, parse_iops)):
        try:
            if value is not None:
                parse(value)
        except DymoeError as exc:
            raise DymoeError(f"{flag}: {exc}") from None

    if sweep is None:
        shares = () if quick else (0.35, 0.75)
    else:
        try:
            shares = tuple(float(s) for s in sweep.split(",") if s.strip())
        except ValueError:
            raise click.BadParameter(f"expected shares such as 0.35,0.75, got {sweep!r}",
                                     param_hint="--sweep") from None
    names = [c.strip() for c in configs.split(",") if c.strip()] if configs else None
    routings = None if routing is None else ("realistic", "random") if routing == "both" else (routing,)
    res = run_bench(BenchOptions(out=out, quick=quick, layers=layers, cap=cap, sweep=shares, tokens=tokens,
                                 configs=names, threads=threads, quality=not no_quality, read_bps=read_bps,
                                 read_iops=read_iops, storage=storage, routing=routings, sweeps=sweeps,
                                 progress=sys.stderr.isatty() and not as_json),
                    log=lambda s: click.echo(s, err=True))
    h = res["headline"]
    first = ("tpot_ratio", "ttft_ratio", "tpot_ratio_tuned", "capped", "read_bps", "read_iops", "throttled",
             "bound_ratio", "callback_share")
    summary = {k: h.get(k) for k in first} | {k: v for k, v in h.items() if k not in first}
    summary["by_model"] = res["by_model"]
    summary["routing"] = {m: {k: s.get(k) for k in ("normalized_entropy", "transition", "lookahead_recall")}
                          for m, s in res["routing"].items()}
    summary["read_bandwidth_bps"] = res["read_bandwidth"].get("bps")
    summary["report"] = res["files"]["markdown"]
    summary["seconds"] = round(res["seconds"], 1)
    text = (Path(res["files"]["markdown"]).read_text() + f"\nwrote {', '.join(res['files'].values())}")
    emit(summary, as_json, text)
