"""Commands that make and read bundles: ``convert``, ``inspect``, ``synth``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dymoe_gguf.cli._app import CONTEXT, cli, emit, errors


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write.")
@click.option("--base-tier", default="Q4_K", show_default=True,
              help="Expert type in the base GGUF: Q2_K..Q6_K, Q8_0, or F16/BF16/F32 (quality reference).")
@click.option("--tiers", default="Q2_K,Q4_K,Q8_0", show_default=True, help="Sidecar tiers, comma-separated.")
@click.option("--imatrix", type=click.Path(path_type=Path), help="llama.cpp GGUF importance matrix.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Type for matching non-expert matrices (repeatable), e.g. 'attn_.*=Q4_K'; norms, routers, "
                   "biases and 1-D tensors are never retyped.")
@click.option("--revision", help="Branch, tag or commit of a Hugging Face repo id.")
@click.option("--requantize", is_flag=True,
              help="Re-encode every tier of a quantized GGUF source, even the one of the source's own type "
                   "[default: copy those bytes].")
@click.option("-t", "--threads", type=click.IntRange(1, 512), help="Quantizer threads [default: all cores].")
@click.option("--force", is_flag=True, help="Replace an existing bundle (never any other directory).")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, tensors, types, sizes); write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@errors
def convert(src: str, out: Path, base_tier: str, tiers: str, imatrix: Path | None, tensor_types: tuple[str, ...],
            revision: str | None, requantize: bool, threads: int | None, force: bool, dry_run: bool, as_json: bool,
            quiet: bool) -> None:
    """Convert SRC (HF directory, HF repo id owner/name[:QUANT], or GGUF) into a bundle."""
    from dymoe_gguf.bundle.format import parse_tier, parse_tiers
    from dymoe_gguf.convert import convert as run_convert
    from dymoe_gguf.convert.plan import describe
    from dymoe_gguf.util import human_bytes

    res = run_convert(src, out, base_tier=parse_tier(base_tier), tiers=parse_tiers(tiers), imatrix=imatrix,
                      tensor_types=tensor_types, threads=threads, force=force, dry_run=dry_run,
                      progress=not (quiet or as_json) and sys.stderr.isatty(), revision=revision,
                      requantize=requantize)
    if dry_run:
        emit(res.plan.to_dict(), as_json, f"plan for {out} (dry run, nothing written)\n{describe(res.plan)}")
        return
    emit(res.to_dict(), as_json,
          f"wrote {out}: {human_bytes(res.bytes_written)} in {res.seconds:.1f}s "
          f"(quantizers {res.quantize_seconds:.1f}s summed over threads), peak RSS {human_bytes(res.peak_rss)}"
          + "".join(f"\nnote: {n}" for n in res.plan.notes))


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every tensor against its stored checksum (reads the "
                                             "whole bundle).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@errors
def inspect(bundle: Path, verify: bool, as_json: bool) -> None:
    """Show a bundle's model, tiers, sizes and memory needs; validate it (and its data with --verify)."""
    from dymoe_gguf.bundle.inspect import inspect_bundle, render

    summary = inspect_bundle(bundle, verify=verify)
    emit(summary, as_json, render(summary))


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
@click.option("--residual-scale", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="How much each layer changes the residual stream (attention / expert output scale).")
@click.option("--router-corr", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Correlation of each layer's router with the previous layer's.")
@click.option("--router-logit-std", type=click.FloatRange(0, min_open=True), default=None,
              help="Router logits' std on a normalised hidden state [default: 0.5*sqrt(d), near one-hot gates].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing directory.")
@errors
def synth(out: Path, arch: str, layers: int, d_model: int, expert_ff: int, experts: int, top_k: int, skew: float,
          residual_scale: float, router_corr: float, router_logit_std: float | None, dtype: str, seed: int,
          force: bool) -> None:
    """Write a synthetic MoE checkpoint (random weights, planted router skew) in HF layout to OUT."""
    from dymoe_gguf.convert.output import check_checkpoint_output
    from dymoe_gguf.synth import SynthConfig, write_synthetic

    check_checkpoint_output(out, force)
    cfg = SynthConfig(arch=arch, n_layer=layers, d=d_model, ff=expert_ff, n_expert=experts, top_k=min(top_k, experts),
                      n_head=max(1, d_model // 64), n_head_kv=max(1, d_model // 128), skew=skew, dtype=dtype,
                      seed=seed, residual_scale=residual_scale, router_corr=router_corr,
                      router_logit_std=router_logit_std)
    path = write_synthetic(out, cfg, force=force)
    click.echo(f"wrote {path}")
