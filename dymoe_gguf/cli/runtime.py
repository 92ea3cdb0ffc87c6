"""Commands that run a bundle: ``run``, ``eval``, ``calibrate``, and the runtime options they share."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dymoe_gguf.cli._app import CONTEXT, cli, emit, errors
from dymoe_gguf.runtime.config import MODE_CHOICES, POLICY_CHOICES
from dymoe_gguf.runtime.decide.depth import DEPTH_KINDS


def _policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``run`` and ``eval`` (and passed to ``Controller.open``)."""
    opts = [
        click.option("--policy", default="dymoe", show_default=True,
                     help=" | ".join(POLICY_CHOICES) + " (see README)"),
        click.option("--budget", default=None, metavar="SIZE",
                     help="Resident expert bytes: 2GiB, 512MiB, or a share of RAM such as 40%. Default: unlimited."),
        click.option("--lookahead", type=click.IntRange(0, 8), default=1, show_default=True,
                     help="Layers predicted ahead for prefetch (0 = off)."),
        click.option("--skip", "skip_threshold", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True, help="Skip selected experts whose gate weight is below this (0 = off)."),
        click.option("--depth", type=click.Choice(DEPTH_KINDS), default="cosine",
                     show_default=True, help="Share of high-precision experts by depth."),
        click.option("--pin", "pins", multiple=True, metavar="LAYER=TIER",
                     help="Pin a layer to a tier (or 'none'), repeatable."),
        click.option("--mode", type=click.Choice(MODE_CHOICES), default="auto",
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
@errors
def run(bundle: Path, prompt: str, n_tokens: int, threads: int | None, ctx: int, as_json: bool,
        **policy: Any) -> None:
    """Generate text from BUNDLE under a policy; print the text, then the controller's stats."""
    from dymoe_gguf.runtime.session import generate

    res = generate(bundle, prompt, n_tokens=n_tokens, n_threads=threads, n_ctx=ctx, **_policy_kwargs(**policy))
    if as_json:
        emit(res, True, "")
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
@click.option("--flash-attn", is_flag=True,
              help="Flash attention, as llama-perplexity's default -fa auto on a CPU [default: off, as run].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@errors
def eval_cmd(bundle: Path, text_file: Path, reference: Path | None, ctx: int, max_chunks: int | None,
             threads: int | None, as_json: bool, flash_attn: bool, quiet: bool, **policy: Any) -> None:
    """Perplexity, KL divergence and top-1 agreement of BUNDLE (under a policy) on held-out text,
    measured as llama-perplexity (--kl-divergence) does."""
    from dymoe_gguf.quality.eval import evaluate

    kw = _policy_kwargs(**policy)
    if click.get_current_context().get_parameter_source("policy") is ParameterSource.DEFAULT:
        kw["policy"] = "off"  # eval measures the bundle as converted unless a policy is asked for
    res = evaluate(bundle, text_file, reference=reference, ctx=ctx, max_chunks=max_chunks, n_threads=threads,
                   flash_attn=flash_attn, progress=not (quiet or as_json) and sys.stderr.isatty(), **kw)
    d = res.to_dict()
    lines = [f"PPL {res.ppl:.4f} +/- {res.ppl_unc:.4f}  ({res.tokens} tokens, {res.chunks} chunks of {res.ctx}; "
             f"policy {res.policy}; reference {res.reference or 'none'})"]
    if res.kl_mean is not None:
        lines.append(f"KL mean {res.kl_mean:.6f} +/- {res.kl_unc:.6f}  median {res.kl_median:.6f}  "
                     f"99% {res.kl_p99:.6f}  99.9% {res.kl_p999:.6f}  max {res.kl_max:.6f}")
        lines.append(f"same top p {100 * res.top1:.3f} +/- {100 * res.top1_unc:.3f} %  "
                     f"mean dp {100 * res.dp_mean:.3f} +/- {100 * res.dp_mean_unc:.3f} %  "
                     f"RMS dp {100 * res.dp_rms:.3f} %  PPL(ref) {res.ppl_base:.4f}")
    emit(d, as_json, "\n".join(lines))


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="Calibration text file.")
@click.option("--ctx", type=click.IntRange(16, 1 << 16), default=512, show_default=True)
@click.option("--chunks", "max_chunks", type=click.IntRange(1, 1 << 20), help="Use at most this many chunks.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Also write an importance matrix (llama.cpp GGUF format) for convert --imatrix.")
@click.option("-t", "--threads", type=click.IntRange(1, 512))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@errors
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
    emit(d, as_json, "\n".join(lines))
