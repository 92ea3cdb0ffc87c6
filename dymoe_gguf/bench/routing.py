"""Routing statistics of a bundle: how skewed, how predictable across layers, how well look-ahead guesses.

The numbers that decide how a cache of experts and a look-ahead prefetch behave, measured through
the product's own code on real llama.cpp:

* ``normalized_entropy`` (per MoE layer, 1 = uniform) and ``top_expert_share`` — load skew, from
  ``calibrate`` (:func:`dymoe_gguf.quality.calibrate.calibrate`); ``excess_entropy`` puts the entropy
  on a scale comparable across expert counts: 0 at the floor ``log k`` (the same k experts for every
  token), 1 at ``log E`` (uniform);
* ``transition`` — how predictable layer l+1's choice is from layer l's (calibrate's predictor);
* ``lookahead_recall`` — the controller's own next-layer look-ahead recall (policy ``dymoe``,
  look-ahead 1, no budget, ``lookahead_min_recall`` 0 so every layer is predicted, Python hot path) on
  the same text.

Calibration runs on a *calibrated copy*: a directory of symlinks to the bundle's files plus the
``calibration.gguf`` it writes, so the bundle itself stays as converted (the bench's speed runs use
it uncalibrated, its ``static`` policy rows use the copy). Used by ``bench`` (both synthetic models, the
trained model) and ``scripts/bench_routing.py`` (any bundle).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from dymoe_gguf.bundle.format import BASE_FILE
from dymoe_gguf.util import atomic_file

PROFILE = "calibration.gguf"


def calibrated_copy(bundle: Path, text: Path, dest: Path, *, ctx: int = 256, chunks: int | None = 8,
                    threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """``dest``: symlinks to ``bundle``'s files and a calibration profile from ``text``; reused when
    ``dest/routing.json`` records the same inputs. Returns (dest, calibrate's summary)."""
    from dymoe_gguf.quality.calibrate import calibrate

    bundle, dest = Path(bundle).resolve(), Path(dest)
    key = {"bundle": str(bundle), "text": str(Path(text).resolve()), "ctx": ctx, "chunks": chunks,
           "files": {f.name: f.stat().st_size for f in sorted(bundle.glob("*.gguf")) if f.name != PROFILE}}
    meta = dest / "calibrate.json"
    if (dest / PROFILE).is_file() and meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("key") == key:
            return dest, old["summary"]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in sorted(bundle.glob("*.gguf")):
        if f.name != PROFILE:
            os.symlink(f, dest / f.name)
    summary = calibrate(dest, Path(text), ctx=ctx, max_chunks=chunks, n_threads=threads).to_dict()
    summary.pop("path", None)
    with atomic_file(meta) as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "summary": summary}))
    return dest, summary


def lookahead_recall(bundle: Path, chunks: list[list[int]], *, ctx: int, threads: int | None) -> dict[str, Any]:
    """The controller's next-layer look-ahead recall over ``chunks`` (every row of every layer scored).

    On the Python hot path: the C one (patches/0003) scores predictions only in one-token decodes, and the
    chunks are evaluated as batches (its ``lookahead_recall`` stays None on them)."""
    from dymoe_gguf.runtime.controller import Controller

    with Controller.open(bundle, policy="dymoe", lookahead=1, lookahead_min_recall=0.0, hot_path="python") as ctl:
        llm = ctl.llama(n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads)
        for chunk in chunks:
            llm.reset()
            llm.eval(chunk)
        s = ctl.stats()
    return {"lookahead_recall": s.lookahead_recall, "lookahead_recall_by_layer": s.lookahead_recall_by_layer}


def excess_entropy(h: float, n_expert: int, top_k: int) -> float:
    """Normalised entropy ``h`` (of E experts, k selected per token) as a share of the way from its floor
    ``log k / log E`` to 1: comparable between an 8-expert top-2 and a 64-expert top-8 model."""
    floor = math.log(top_k) / math.log(n_expert)
    return (h - floor) / (1 - floor)


def routing_stats(bundle: Path, text: Path, *, ctx: int = 256, chunks: int | None = 8, threads: int | None = None,
                  calibrated: Path | None = None) -> dict[str, Any]:
    """Load skew, cross-layer predictability and look-ahead recall of ``bundle`` on ``text``.

    ``calibrated``: where to keep the calibrated copy (reused across runs); default a temporary one."""
    import tempfile

    from dymoe_gguf._native.llama import open_llama
    from dymoe_gguf.bundle import BundleIndex
    from dymoe_gguf.quality.eval import tokenize_chunks

    tmp = None if calibrated is not None else Path(tempfile.mkdtemp(prefix="dymoe-routing-"))
    try:
        copy, cal = calibrated_copy(Path(bundle), text, calibrated or tmp / Path(bundle).name, ctx=ctx,
                                    chunks=chunks, threads=threads)
        llm = open_llama(copy / BASE_FILE, vocab_only=True, n_ctx=ctx)
        try:
            toks = tokenize_chunks(llm, Path(text).read_text(encoding="utf-8", errors="replace"), ctx, chunks)
        finally:
            llm.close()
        la = lookahead_recall(copy, toks, ctx=ctx, threads=threads)
        idx = BundleIndex(copy)
        k = top_k(idx)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ent = cal["normalized_entropy"]
    return {"bundle": str(bundle), "text": str(text), "ctx": ctx, "chunks": chunks, "tokens": cal["tokens"],
            "n_expert": idx.n_expert, "top_k": k, "normalized_entropy": ent,
            "excess_entropy": [excess_entropy(h, idx.n_expert, k) for h in ent] if k else None,
            "top_expert_share": cal["top_expert_share"], "transition": cal["transition"], **la}


def top_k(index: Any) -> int | None:
    """top-k of the model (``<arch>.expert_used_count`` in the base GGUF)."""
    import gguf

    f = gguf.GGUFReader(index.base_path, "r").get_field(f"{index.arch}.expert_used_count")
    return int(f.contents()) if f is not None else None
