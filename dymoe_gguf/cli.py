"""The ``dymoe-gguf`` command line: thin wrappers, one library call per command.

Library errors (:class:`~dymoe_gguf.errors.DymoeError`) become a one-line message and exit 1.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dymoe_gguf import __version__
from dymoe_gguf.errors import DymoeError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into ClickException (one line, exit 1) and Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DymoeError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was left behind.", err=True)
            sys.exit(130)

    return wrapper


def _emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False) if as_json else text)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="dymoe-gguf")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """Run Mixture-of-Experts GGUF models in less memory than they need, with llama.cpp."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write.")
@click.option("--base-tier", default="Q4_K", show_default=True,
              help="Expert type in the base GGUF: Q2_K..Q6_K, Q8_0, or F16/BF16/F32 (quality reference).")
@click.option("--tiers", default="Q2_K,Q4_K,Q8_0", show_default=True, help="Sidecar tiers, comma-separated.")
@click.option("--imatrix", type=click.Path(path_type=Path), help="llama.cpp GGUF importance matrix.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Type for matching non-expert tensors (repeatable), e.g. 'attn_.*=Q4_K'.")
@click.option("-t", "--threads", type=click.IntRange(1, 512), help="Quantizer threads [default: all cores].")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, tensors, types, sizes); write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_errors
def convert(src: str, out: Path, base_tier: str, tiers: str, imatrix: Path | None, tensor_types: tuple[str, ...],
            threads: int | None, force: bool, dry_run: bool, as_json: bool, quiet: bool) -> None:
    """Convert SRC (HF directory, HF repo id, or GGUF) into a bundle."""
    from dymoe_gguf.bundle.format import parse_tier, parse_tiers
    from dymoe_gguf.convert import convert as run_convert
    from dymoe_gguf.convert.plan import describe
    from dymoe_gguf.util import human_bytes

    res = run_convert(src, out, base_tier=parse_tier(base_tier), tiers=parse_tiers(tiers), imatrix=imatrix,
                      tensor_types=tensor_types, threads=threads, force=force, dry_run=dry_run,
                      progress=not (quiet or as_json) and sys.stderr.isatty())
    if dry_run:
        _emit(res.plan.to_dict(), as_json, f"plan for {out} (dry run, nothing written)\n{describe(res.plan)}")
        return
    _emit(res.to_dict(), as_json,
          f"wrote {out}: {human_bytes(res.bytes_written)} in {res.seconds:.1f}s "
          f"(quantizers {res.quantize_seconds:.1f}s summed over threads), peak RSS {human_bytes(res.peak_rss)}"
          + "".join(f"\nnote: {n}" for n in res.plan.notes))


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's tiers, sizes per tier and layer, alignment; validate it."""
    from dymoe_gguf.bundle.inspect import inspect_bundle, render

    summary = inspect_bundle(bundle)
    _emit(summary, as_json, render(summary))


@cli.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["mixtral", "qwen2moe", "qwen3moe", "olmoe"]), default="qwen3moe",
              show_default=True)
@click.option("--layers", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--d-model", type=click.IntRange(32, 16384), default=256, show_default=True)
@click.option("--expert-ff", type=click.IntRange(32, 65536), default=256, show_default=True)
@click.option("--experts", type=click.IntRange(2, 512), default=8, show_default=True)
@click.option("--top-k", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--skew", type=click.FloatRange(0, 100), default=3.0, show_default=True,
              help="Router skew: 0 routes uniformly, larger values favour a few experts per layer.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing directory.")
@_errors
def synth(out: Path, arch: str, layers: int, d_model: int, expert_ff: int, experts: int, top_k: int, skew: float,
          dtype: str, seed: int, force: bool) -> None:
    """Write a synthetic MoE checkpoint (random weights, planted router skew) in HF layout to OUT."""
    from dymoe_gguf.synth import SynthConfig, write_synthetic

    cfg = SynthConfig(arch=arch, n_layer=layers, d=d_model, ff=expert_ff, n_expert=experts, top_k=min(top_k, experts),
                      n_head=max(1, d_model // 64), n_head_kv=max(1, d_model // 128), skew=skew, dtype=dtype,
                      seed=seed)
    path = write_synthetic(out, cfg, force=force)
    click.echo(f"wrote {path}")


def _policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``run`` and ``eval`` (and passed to ``Controller.open``)."""
    opts = [
        click.option("--policy", default="dymoe", show_default=True,
                     help="dymoe | static (calibration profile, frozen) | off (plain llama.cpp) | uniform:TIER"),
        click.option("--budget", default=None, metavar="SIZE",
                     help="Resident expert bytes: 2GiB, 512MiB, or a share of RAM such as 40%. Default: unlimited."),
        click.option("--lookahead", type=click.IntRange(0, 8), default=1, show_default=True,
                     help="Layers predicted ahead for prefetch (0 = off)."),
        click.option("--skip", "skip_threshold", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True, help="Skip selected experts whose gate weight is below this (0 = off)."),
        click.option("--depth", type=click.Choice(["cosine", "linear", "constant"]), default="cosine",
                     show_default=True, help="Share of high-precision experts by depth."),
        click.option("--pin", "pins", multiple=True, metavar="LAYER=TIER",
                     help="Pin a layer to a tier (or 'none'), repeatable."),
        click.option("--mode", type=click.Choice(["auto", "per-layer", "per-expert"]), default="auto",
                     show_default=True, help="Per-expert views need the patched llama.cpp."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _policy_kwargs(policy: str, budget: str | None, lookahead: int, skip_threshold: float, depth: str,
                   pins: tuple[str, ...], mode: str) -> dict[str, Any]:
    pin_map = {}
    for p in pins:
        layer, sep, tier = p.partition("=")
        if not sep or not layer.strip().isdigit():
            raise click.BadParameter(f"expected LAYER=TIER, got {p!r}", param_hint="--pin")
        pin_map[int(layer)] = tier.strip()
    return {"policy": policy, "memory_budget": budget, "lookahead": lookahead, "skip_threshold": skip_threshold,
            "depth": depth, "pins": pin_map, "mode": mode}


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "--n-tokens", type=click.IntRange(1, 1_000_000), default=64, show_default=True)
@click.option("-t", "--threads", type=click.IntRange(1, 512), help="Threads [default: llama.cpp's].")
@click.option("--ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True)
@_policy_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (text and stats).")
@_errors
def run(bundle: Path, prompt: str, n_tokens: int, threads: int | None, ctx: int, as_json: bool,
        **policy: Any) -> None:
    """Generate text from BUNDLE under a policy; print the text, then the controller's stats."""
    from dymoe_gguf.runtime.session import generate

    res = generate(bundle, prompt, n_tokens=n_tokens, n_threads=threads, n_ctx=ctx, **_policy_kwargs(**policy))
    if as_json:
        _emit(res, True, "")
        return
    click.echo(prompt + res["text"])
    click.echo(json.dumps(res["stats"]))


@cli.command("eval", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="Held-out text file.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Reference model (GGUF or bundle) [default: the bundle's base if full precision].")
@click.option("--ctx", type=click.IntRange(16, 1 << 16), default=512, show_default=True)
@click.option("--chunks", "max_chunks", type=click.IntRange(1, 1 << 20), help="Evaluate at most this many chunks.")
@click.option("-t", "--threads", type=click.IntRange(1, 512))
@_policy_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def eval_cmd(bundle: Path, text_file: Path, reference: Path | None, ctx: int, max_chunks: int | None,
             threads: int | None, as_json: bool, **policy: Any) -> None:
    """Perplexity, KL divergence and top-1 agreement of BUNDLE (under a policy) on held-out text."""
    from dymoe_gguf.quality.eval import evaluate

    kw = _policy_kwargs(**policy)
    if policy["policy"] == "dymoe" and "--policy" not in sys.argv:
        kw["policy"] = "off"  # eval measures the bundle as converted unless a policy is asked for
    res = evaluate(bundle, text_file, reference=reference, ctx=ctx, max_chunks=max_chunks, n_threads=threads, **kw)
    d = res.to_dict()
    kl = "n/a" if res.kl_mean is None else f"{res.kl_mean:.5f}"
    top1 = "n/a" if res.top1 is None else f"{100 * res.top1:.2f}%"
    _emit(d, as_json, f"ppl {res.ppl:.4f}  KL {kl}  top-1 {top1}  ({res.tokens} tokens, {res.chunks} chunks of "
                      f"{res.ctx}; policy {res.policy}; reference {res.reference})")


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="Calibration text file.")
@click.option("--ctx", type=click.IntRange(16, 1 << 16), default=512, show_default=True)
@click.option("--chunks", "max_chunks", type=click.IntRange(1, 1 << 20), help="Use at most this many chunks.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Also write an importance matrix (llama.cpp GGUF format) for convert --imatrix.")
@click.option("-t", "--threads", type=click.IntRange(1, 512))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def calibrate(bundle: Path, text_file: Path, ctx: int, max_chunks: int | None, imatrix: Path | None,
              threads: int | None, as_json: bool) -> None:
    """Record BUNDLE's routing on calibration text; store the importance profile in the bundle."""
    from dymoe_gguf.quality.calibrate import calibrate as run_calibrate

    res = run_calibrate(bundle, text_file, ctx=ctx, max_chunks=max_chunks, imatrix_out=imatrix, n_threads=threads)
    d = res.to_dict()
    lines = [f"profile of {d['tokens']} tokens -> {d['path']}" + (f"; imatrix -> {d['imatrix']}" if imatrix else "")]
    for i, (h, top) in enumerate(zip(d["normalized_entropy"], d["top_expert_share"])):
        tr = d["transition"][i] if i < len(d["transition"]) else None
        lines.append(f"  MoE layer {i}: load entropy {h:.3f} (1 = uniform), hottest expert {100 * top:.1f}% of "
                     f"selections" + (f", next-layer predictability {tr:.3f}" if tr is not None else ""))
    _emit(d, as_json, "\n".join(lines))


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def doctor(as_json: bool) -> None:
    """Report the llama.cpp build, patch status, page size, memory cap and paging calls available."""
    from dymoe_gguf.doctor import diagnose, render

    info = diagnose()
    _emit(info, as_json, render(info))


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
@_errors
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
    _emit(summary, as_json, text)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dymoe-gguf")


if __name__ == "__main__":  # pragma: no cover
    main()
