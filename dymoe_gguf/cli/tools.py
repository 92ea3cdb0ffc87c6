"""Commands about the machine and speed: ``doctor``, ``bench``."""

from __future__ import annotations

from pathlib import Path

import click

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


@cli.command(context_settings=CONTEXT)
@click.option("--quick", is_flag=True, help="Small run (2 layers; baseline, tuned stock, dymoe per-expert): < 5 min.")
@click.option("--layers", type=click.IntRange(1, 64), help="Layers of the synthetic model [default: 4, quick: 2].")
@click.option("--cap", default="50%", show_default=True,
              help="Memory cap per configuration: a share of the Q4_K model (50%, 0.5) or a size (455MB).")
@click.option("--sweep", default=None, metavar="SHARES",
              help="Extra caps as shares of the Q4_K model for the TPOT-vs-budget plot, e.g. 0.35,0.75 "
                   "[default: 0.35,0.75; none with --quick].")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
              help="Directory for result.json, report.md and the plots.")
@click.option("--tokens", type=click.IntRange(64, 100_000), default=64, show_default=True,
              help="Decode steps per configuration (TPOT is their median).")
@click.option("--configs", default=None, help="Comma-separated configuration names [default: all; quick: 4].")
@click.option("-t", "--threads", type=click.IntRange(1, 512), help="Threads [default: all cores].")
@click.option("--no-quality", is_flag=True, help="Skip the quality columns (trained model).")
@click.option("--read-bps", "read_bps", default=None, metavar="RATE",
              help="Throttle every configuration's storage reads to RATE bytes/s (90MB ~ a Raspberry Pi SD card, "
                   "800MB ~ NVMe) with a blkio / io.max cgroup on the disk holding the models [default: off].")
@click.option("--json", "as_json", is_flag=True, help="Print the headline as JSON.")
@errors
def bench(quick: bool, layers: int | None, cap: str, sweep: str | None, out: Path, tokens: int, configs: str | None,
          threads: int | None, no_quality: bool, read_bps: str | None, as_json: bool) -> None:
    """Stock llama.cpp against dymoe under a memory cap (cgroup), cold cache, one run; ratios and a report."""
    from dymoe_gguf.bench.cgroup import parse_rate
    from dymoe_gguf.bench.run import BenchOptions, run_bench

    try:
        rate = parse_rate(read_bps) if read_bps is not None else None
    except DymoeError as exc:
        raise DymoeError(f"--read-bps: {exc}") from None

    if sweep is None:
        shares = () if quick else (0.35, 0.75)
    else:
        try:
            shares = tuple(float(s) for s in sweep.split(",") if s.strip())
        except ValueError:
            raise click.BadParameter(f"expected shares such as 0.35,0.75, got {sweep!r}",
                                     param_hint="--sweep") from None
    names = [c.strip() for c in configs.split(",") if c.strip()] if configs else None
    res = run_bench(BenchOptions(out=out, quick=quick, layers=layers, cap=cap, sweep=shares, tokens=tokens,
                                 configs=names, threads=threads, quality=not no_quality, read_bps=rate),
                    log=lambda s: click.echo(s, err=True))
    h = res["headline"]
    first = ("tpot_ratio", "ttft_ratio", "tpot_ratio_tuned", "capped", "read_bps", "throttled")
    summary = {k: h.get(k) for k in first} | {k: v for k, v in h.items() if k not in first}
    summary["report"] = res["files"]["markdown"]
    summary["seconds"] = round(res["seconds"], 1)
    text = (Path(res["files"]["markdown"]).read_text() + f"\nwrote {', '.join(res['files'].values())}")
    emit(summary, as_json, text)
