"""``dymoe-gguf eval``: perplexity, KL divergence and top-1 agreement against a reference model.

The protocol is llama-perplexity's (``tools/perplexity/perplexity.cpp`` of the pinned llama.cpp), so
the numbers are the ones ``llama-perplexity -f TEXT -c CTX`` and ``--kl-divergence`` print for the
same model (tests/quality/test_llama_perplexity.py checks it against the real tool):

* the text file's bytes, less one trailing newline (as ``-f`` reads it), are tokenized once, with BOS
  in front when the vocabulary adds one and no special-token parsing;
* the tokens are cut into ``len // ctx`` chunks of ``ctx`` tokens; each chunk is evaluated from an
  empty context with its first token replaced by BOS (when the vocabulary adds one);
* the second half of each chunk is scored: logits at positions ctx/2 .. ctx-2 predict the next token;
* KL, "same top p" (``top1``) and Δp against the reference as ``--kl-divergence`` computes them from
  its 16-bit ``--kl-divergence-base`` file (see :mod:`dymoe_gguf.quality.ppl_stats`).

llama-perplexity evaluates ``n_batch / ctx`` chunks per batch as parallel sequences; here one chunk
is one batch (``llama-perplexity -b CTX`` does the same), which changes float rounding only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dymoe_gguf._native.llama import open_llama, vocab_special
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.errors import DymoeError
from dymoe_gguf.quality import ppl_stats


@dataclass(frozen=True)
class EvalResult:
    """Quality of one model (or policy) on held-out text, with llama-perplexity's statistics.

    KL fields and ``top1`` are None without a reference. ``top1`` is llama-perplexity's "Same top p";
    ``*_unc`` are its uncertainties; ``dp_*`` its Δp (probability of the actual next token, evaluated
    minus reference); ``ppl_base`` the reference's perplexity from its stored log-probabilities.
    """

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
    ppl_unc: float | None = None
    ppl_base: float | None = None
    ppl_ratio: float | None = None
    kl_unc: float | None = None
    kl_median: float | None = None
    kl_p90: float | None = None
    kl_p95: float | None = None
    kl_p999: float | None = None
    kl_max: float | None = None
    top1_unc: float | None = None
    dp_mean: float | None = None
    dp_mean_unc: float | None = None
    dp_rms: float | None = None
    protocol: str = "llama-perplexity"

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: Path) -> bytes:
    """The file's bytes less one trailing newline, as llama.cpp's ``-f`` reads a prompt file."""
    if not path.exists():
        raise DymoeError(f"Text file {path} does not exist")
    if not path.is_file():
        raise DymoeError(f"Text file {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DymoeError(f"Cannot read text file {path}: {exc.strerror or exc}") from None
    return data[:-1] if data.endswith(b"\n") else data


def tokenize_chunks(llm: Any, text: bytes | str, ctx: int, max_chunks: int | None) -> list[list[int]]:
    """The text's tokens (BOS first if the vocabulary adds one) cut into chunks of ``ctx``, each
    starting with BOS in place of its first token when the vocabulary adds one."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    add_bos, add_eos = vocab_special(llm)
    if add_eos:
        raise DymoeError("The model's vocabulary appends EOS to every text; llama-perplexity's protocol needs it off")
    toks = llm.tokenize(data, add_bos=True, special=False)  # add_bos=True: BOS only if the vocabulary adds one
    n = len(toks) // ctx
    if max_chunks:
        n = min(n, max_chunks)
    if n == 0:
        raise DymoeError(f"The text has {len(toks)} tokens: at least --ctx ({ctx}) are needed for one chunk")
    bos = llm.token_bos()
    chunks = []
    for i in range(n):
        c = list(toks[i * ctx:(i + 1) * ctx])
        if add_bos:
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


def _reference_path(reference: Path | None, index: BundleIndex) -> Path | None:
    """The reference GGUF: ``reference`` (a GGUF file or a bundle directory) or the default."""
    if reference is None:
        return default_reference(index)
    ref = Path(reference)
    if ref.is_dir():
        return BundleIndex(ref).base_path
    if not ref.exists():
        raise DymoeError(f"Reference model {ref} does not exist")
    try:
        with open(ref, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DymoeError(f"Cannot read reference model {ref}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise DymoeError(f"Reference model {ref} is not a GGUF file or a bundle directory")
    return ref


def _open_reference(path: Path, **kwargs: Any) -> Any:
    try:
        return open_llama(path, **kwargs)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        raise DymoeError(f"llama.cpp cannot load the reference model {path}: {exc}") from None


def evaluate(bundle: Path, text_file: Path, *, reference: Path | None = None, ctx: int = 512,
             max_chunks: int | None = None, policy: str = "off", n_threads: int | None = None,
             tiers: Any = None, progress: bool = False, flash_attn: bool = False,
             **policy_options: Any) -> EvalResult:
    """Evaluate ``bundle`` (under ``policy``) on ``text_file`` against ``reference``.

    ``tiers`` (policy ``manual``) is passed to :meth:`Controller.set_tiers` once the model is loaded.
    ``progress`` shows a tqdm bar over the chunks (on stderr). Both models load without llama.cpp's
    extra buffer types (``--no-repack``); ``flash_attn`` is off as in llama-cpp-python (llama-perplexity's
    default ``-fa auto`` turns it on for the CPU: pass True to reproduce that, or run the tool with
    ``-fa off``).
    """
    from dymoe_gguf.runtime.controller import Controller

    text = read_text(Path(text_file))
    index = BundleIndex(bundle)
    ref_path = _reference_path(reference, index)
    kwargs = {"n_ctx": ctx, "n_batch": ctx, "n_ubatch": ctx, "logits_all": True, "n_threads": n_threads,
              "flash_attn": flash_attn}
    ctl = Controller.open(bundle, policy=policy, **policy_options)
    ref_llm = None
    try:
        # never llama.cpp's extra buffer types (repack, AMX), for every policy and the reference alike
        llm = ctl.llama(repack=False, **kwargs)
        if tiers is not None:
            ctl.set_tiers(tiers)
        chunks = tokenize_chunks(llm, text, ctx, max_chunks)
        same = ref_path is not None and Path(ref_path) == index.base_path and policy == "off"
        if ref_path is not None and not same:
            ref_llm = _open_reference(ref_path, **kwargs)
            if ref_llm.n_vocab() != llm.n_vocab():
                raise DymoeError(f"Reference {ref_path} has a vocabulary of {ref_llm.n_vocab()}, "
                                 f"the bundle {llm.n_vocab()}: not the same model")
        first = ctx // 2
        acc = ppl_stats.Accumulator()
        with tqdm(chunks, unit="chunk", desc="eval", disable=not progress) as bar:
            for chunk in bar:
                logits = chunk_logits(llm, chunk)[first:ctx - 1]
                target = np.array(chunk[first + 1:ctx])
                kl = None
                if ref_path is not None:  # same model: the stored reference is the evaluated run itself
                    ref = chunk_logits(ref_llm, chunk)[first:ctx - 1] if ref_llm is not None else logits
                    kl = ppl_stats.kl_scores(logits, ppl_stats.store_log_probs(ref), target)
                acc.add(ppl_stats.nll(logits, target), kl)
        stats = ctl.stats().to_dict() if policy != "off" else None
        if stats:
            stats.pop("tiers_by_layer", None)
        return EvalResult(**acc.summary(), tokens=acc.count, chunks=len(chunks), ctx=ctx,
                          reference=str(ref_path) if ref_path is not None else None, policy=policy, stats=stats)
    finally:
        if ref_llm is not None:
            ref_llm.close()
        ctl.close()


__all__ = ["EvalResult", "Tier", "evaluate", "read_text", "tokenize_chunks"]
