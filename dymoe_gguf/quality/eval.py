"""``dymoe-gguf eval``: perplexity, KL divergence and top-1 agreement against a reference model.

Measured the way ``llama-perplexity --kl-divergence`` does: the text is tokenized once and cut into
chunks of ``ctx`` tokens; the first token of each chunk is replaced by BOS when the model adds one;
only the second half of each chunk is scored (logits at positions ctx/2 .. ctx-2 predicting the
next token). KL is KL(reference || evaluated) per scored position, averaged; top-1 is the share of
positions where both models' most likely token agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dymoe_gguf._native.llama import open_llama
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.errors import DymoeError


@dataclass(frozen=True)
class EvalResult:
    """Quality of one model (or policy) on held-out text."""

    ppl: float
    kl_mean: float | None
    kl_p99: float | None
    top1: float | None
    tokens: int  # scored tokens
    chunks: int
    ctx: int
    reference: str | None
    policy: str
    stats: dict | None = None  # controller stats when a policy ran

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def tokenize_chunks(llm: Any, text: str, ctx: int, max_chunks: int | None) -> list[list[int]]:
    """The text's tokens cut into chunks of ``ctx`` (BOS replacing each chunk's first token if used)."""
    toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n = len(toks) // ctx
    if max_chunks:
        n = min(n, max_chunks)
    if n == 0:
        raise DymoeError(f"The text has {len(toks)} tokens: at least --ctx ({ctx}) are needed for one chunk")
    bos = llm.token_bos()
    add_bos = bool(llm._model.add_bos_token()) if hasattr(llm._model, "add_bos_token") else bos >= 0  # noqa: SLF001
    chunks = []
    for i in range(n):
        c = list(toks[i * ctx:(i + 1) * ctx])
        if add_bos and bos >= 0:
            c[0] = bos
        chunks.append(c)
    return chunks


def chunk_logits(llm: Any, chunk: list[int]) -> np.ndarray:
    """Logits ``[ctx, vocab]`` of one chunk, evaluated from an empty context."""
    llm.reset()
    llm.eval(chunk)
    return np.array(llm.scores[: len(chunk)], dtype=np.float32)


def default_reference(index: BundleIndex) -> Path | None:
    """The full-precision model to compare with: the bundle's own base if it is full precision."""
    if index.base_tier.is_full_precision:
        return index.base_path
    return None


def evaluate(bundle: Path, text_file: Path, *, reference: Path | None = None, ctx: int = 512,
             max_chunks: int | None = None, policy: str = "off", n_threads: int | None = None,
             tiers: Any = None, **policy_options: Any) -> EvalResult:
    """Evaluate ``bundle`` (under ``policy``) on ``text_file`` against ``reference``.

    ``tiers`` (policy ``manual``) is passed to :meth:`Controller.set_tiers` once the model is loaded.
    """
    from dymoe_gguf.runtime.controller import Controller

    if not text_file.is_file():
        raise DymoeError(f"Text file {text_file} does not exist")
    text = text_file.read_text(encoding="utf-8", errors="replace")
    index = BundleIndex(bundle)
    ref_path = reference or default_reference(index)
    if ref_path is not None and Path(ref_path).is_dir():
        ref_path = BundleIndex(Path(ref_path)).base_path
    if ref_path is not None and not Path(ref_path).is_file():
        raise DymoeError(f"Reference model {ref_path} does not exist")
    kwargs = {"n_ctx": ctx, "n_batch": ctx, "n_ubatch": ctx, "logits_all": True, "n_threads": n_threads}
    ctl = Controller.open(bundle, policy=policy, **policy_options)
    ref_llm = None
    try:
        llm = ctl.llama(**kwargs)
        if tiers is not None:
            ctl.set_tiers(tiers)
        chunks = tokenize_chunks(llm, text, ctx, max_chunks)
        same = ref_path is not None and Path(ref_path) == index.base_path and policy == "off"
        if ref_path is not None and not same:
            ref_llm = open_llama(ref_path, **kwargs)
            if ref_llm.n_vocab() != llm.n_vocab():
                raise DymoeError(f"Reference {ref_path} has a vocabulary of {ref_llm.n_vocab()}, "
                                 f"the bundle {llm.n_vocab()}: not the same model")
        first = ctx // 2
        nll, kls, agree, n = 0.0, [], 0, 0
        for chunk in chunks:
            lp = _log_softmax(chunk_logits(llm, chunk)[first:ctx - 1])
            target = np.array(chunk[first + 1:ctx])
            nll -= float(lp[np.arange(len(target)), target].sum())
            n += len(target)
            if ref_path is not None:  # same model: the reference is the evaluated run itself
                ref = _log_softmax(chunk_logits(ref_llm, chunk)[first:ctx - 1]) if ref_llm is not None else lp
                kls.append((np.exp(ref) * (ref - lp)).sum(-1))
                agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        kl = np.concatenate(kls) if kls else None
        stats = ctl.stats().to_dict() if policy != "off" else None
        if stats:
            stats.pop("tiers_by_layer", None)
        return EvalResult(
            ppl=math.exp(nll / n), kl_mean=float(kl.mean()) if kl is not None else None,
            kl_p99=float(np.percentile(kl, 99)) if kl is not None else None,
            top1=agree / n if kl is not None else None, tokens=n, chunks=len(chunks), ctx=ctx,
            reference=str(ref_path) if ref_path is not None else None, policy=policy, stats=stats)
    finally:
        if ref_llm is not None:
            ref_llm.close()
        ctl.close()


__all__ = ["EvalResult", "Tier", "evaluate"]
