"""Commands that run a bundle: ``run``, ``eval``, ``calibrate``, and the options they (and ``chat``,
``serve``) share."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dymoe_gguf.cli._app import CONTEXT, cli, emit, errors, log_options, quiet
from dymoe_gguf.runtime.config import MODE_CHOICES, POLICY_CHOICES
from dymoe_gguf.runtime.decide.depth import DEPTH_KINDS


def _policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``run`` and ``eval`` (and passed to ``Controller.open``)."""
    opts = [
        click.option("--policy", default="dymoe", show_default=True,
                     help=" | ".join(POLICY_CHOICES) + " (see README)"),
        click.option("--budget", default=None, metavar="SIZE",
                     help="Resident expert bytes: 2GiB, 512MiB, a share of RAM such as 40%, or auto (free RAM minus "
                          "dense weights, KV cache and a margin). Default: unlimited."),
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
        click.option("--prefer", default="balanced", show_default=True, metavar="speed|balanced|quality|N",
                     help="Under a budget, trade miss time against precision (a number: quality's weight)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _policy_kwargs(policy: str, budget: str | None, lookahead: int, skip_threshold: float, depth: str,
                   pins: tuple[str, ...], mode: str, prefer: str) -> dict[str, Any]:
    pin_map = {}
    for p in pins:
        layer, sep, tier = p.partition("=")
        if not sep or not layer.strip().isdigit():
            raise click.BadParameter(f"expected LAYER=TIER, got {p!r}", param_hint="--pin")
        pin_map[int(layer)] = tier.strip()
    return {"policy": policy, "memory_budget": budget, "lookahead": lookahead, "skip_threshold": skip_threshold,
            "depth": depth, "pins": pin_map, "mode": mode, "prefer": prefer}


def sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """llama-cli's sampling flags (``run``, ``chat``); greedy unless ``--temp`` is above 0."""
    opts = [
        click.option("--temp", "temperature", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="Temperature (0 = greedy)."),
        click.option("--top-k", type=click.IntRange(0), default=40, show_default=True, help="Top-k (0 = off)."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(0), default=1.0, show_default=True,
                     help="1.0 = off."),
        click.option("--seed", type=int, default=-1, show_default=True, help="Sampling seed (-1 = random)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """BUNDLE, or ``-m/--model`` as llama.cpp's tools take it; ``-c/--ctx``; ``-t/--threads``."""
    opts = [
        click.argument("bundle", required=False, type=click.Path(path_type=Path)),
        click.option("-m", "--model", type=click.Path(path_type=Path), help="The bundle (instead of BUNDLE)."),
        click.option("-c", "--ctx", type=click.IntRange(0, 1 << 24), default=0,
                     help="Context size in tokens [default: 0 = the model's training context]."),
        click.option("-t", "--threads", type=click.IntRange(1, 512), help="Threads [default: llama.cpp's]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def the_bundle(bundle: Path | None, model: Path | None) -> Path:
    """The bundle given as BUNDLE or ``-m``, exactly once."""
    if bundle is not None and model is not None and bundle != model:
        raise click.ClickException(f"Two bundles given ({bundle} and -m {model}): pass one")
    if bundle is None and model is None:
        raise click.ClickException("Missing the bundle: pass BUNDLE or -m/--model BUNDLE")
    return bundle if bundle is not None else model  # type: ignore[return-value]


def pop_sampling(opts: dict[str, Any]) -> Any:
    """Take the flags of :func:`sampling_options` out of ``opts``: a
    :class:`~dymoe_gguf.runtime.session.Sampling`."""
    from dymoe_gguf.runtime.session import Sampling

    seed = opts.pop("seed")
    return Sampling(temperature=opts.pop("temperature"), top_k=opts.pop("top_k"), top_p=opts.pop("top_p"),
                    min_p=opts.pop("min_p"), repeat_penalty=opts.pop("repeat_penalty"),
                    seed=None if seed < 0 else seed)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise click.ClickException("Give the prompt once: -p TEXT or -f FILE, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise click.ClickException(f"Cannot read the prompt file {prompt_file}: {reason}") from None
    if prompt is None:
        raise click.ClickException("Missing the prompt: pass -p TEXT or -f FILE")
    return prompt


@cli.command(context_settings=CONTEXT)
@model_options
@click.option("-p", "--prompt", help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=Path), help="Read the prompt from FILE.")
@click.option("-n", "--n-tokens", type=click.IntRange(-1, 1_000_000), default=64, show_default=True,
              help="Tokens to generate (-1: until the end of generation or of the context).")
@sampling_options
@_policy_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (text, timings and stats) instead of streaming.")
@click.option("--stats", "show_stats", is_flag=True, help="Also print the controller's full stats (JSON, stderr).")
@log_options
@errors
def run(bundle: Path | None, model: Path | None, ctx: int, threads: int | None, prompt: str | None,
        prompt_file: Path | None, n_tokens: int, as_json: bool, show_stats: bool, **opts: Any) -> None:
    """Generate text from BUNDLE under a policy, streamed; a summary follows on stderr."""
    from dymoe_gguf.runtime.session import Session

    path = the_bundle(bundle, model)
    text = _read_prompt(prompt, prompt_file)
    sampling = pop_sampling(opts)
    with Session.open(path, n_ctx=ctx, n_threads=threads, **_policy_kwargs(**opts)) as s:
        if as_json:
            out = "".join(s.complete(text, max_tokens=n_tokens, sampling=sampling))
            stats = s.stats()
            stats.pop("tiers_by_layer", None)
            emit({"text": out, "n_ctx": s.n_ctx, "timings": s.timings.to_dict(), "stats": stats}, True, "")
            return
        pieces = s.complete(text, max_tokens=n_tokens, sampling=sampling)  # a prompt too long fails here
        click.echo(text, nl=False)
        for piece in pieces:
            click.echo(piece, nl=False)  # echo flushes: tokens appear as they are generated
        click.echo()
        if not quiet():
            click.echo(s.summary(), err=True)
        if show_stats:
            click.echo(json.dumps(s.stats()), err=True)


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
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@errors
def calibrate(bundle: Path, text_file: Path, ctx: int, max_chunks: int | None, imatrix: Path | None,
              threads: int | None, quiet: bool, as_json: bool) -> None:
    """Record BUNDLE's routing on calibration text; store the importance profile in the bundle."""
    from dymoe_gguf.quality.calibrate import calibrate as run_calibrate

    res = run_calibrate(bundle, text_file, ctx=ctx, max_chunks=max_chunks, imatrix_out=imatrix, n_threads=threads,
                        progress=not (quiet or as_json) and sys.stderr.isatty())
    d = res.to_dict()
    lines = [f"profile of {d['tokens']} tokens -> {d['path']}" + (f"; imatrix -> {d['imatrix']}" if imatrix else "")]
    for i, (h, top) in enumerate(zip(d["normalized_entropy"], d["top_expert_share"])):
        tr = d["transition"][i] if i < len(d["transition"]) else None
        lines.append(f"  MoE layer {i}: load entropy {h:.3f} (1 = uniform), hottest expert {100 * top:.1f}% of "
                     f"selections" + (f", next-layer predictability {tr:.3f}" if tr is not None else ""))
    emit(d, as_json, "\n".join(lines))
