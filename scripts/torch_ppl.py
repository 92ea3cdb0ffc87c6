"""PyTorch perplexity of an HF checkpoint with llama-perplexity's protocol (torch + transformers only here).

    /root/venvs/train/bin/python scripts/torch_ppl.py models/tiny-moe --text data/heldout.txt --ctx 256 [--chunks N]

Tokenizes the whole text with the model's SentencePiece tokenizer (no BOS), cuts it into chunks of
``ctx`` tokens, replaces each chunk's first token with BOS (the model adds one), and scores the second
half of each chunk (logits at positions ctx/2 .. ctx-2 predicting the next token) — exactly what
``dymoe-gguf eval`` and ``llama-perplexity`` do, so the two numbers are comparable. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def main() -> None:
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sp = spm.SentencePieceProcessor(model_file=str(args.model / "tokenizer.model"))
    toks = sp.encode(args.text.read_text(encoding="utf-8"))
    n = len(toks) // args.ctx
    if args.chunks:
        n = min(n, args.chunks)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    first, nll, count = args.ctx // 2, 0.0, 0
    with torch.no_grad():
        for i in range(n):
            chunk = toks[i * args.ctx:(i + 1) * args.ctx]
            chunk[0] = sp.bos_id()
            logits = model(torch.tensor([chunk])).logits[0, first:args.ctx - 1].double()
            target = torch.tensor(chunk[first + 1:args.ctx])
            nll -= torch.log_softmax(logits, -1)[torch.arange(len(target)), target].sum().item()
            count += len(target)
    print(json.dumps({"ppl": math.exp(nll / count), "tokens": count, "chunks": n, "ctx": args.ctx,
                      "text": args.text.name, "protocol": "llama-perplexity (BOS first, second half scored)"}))


if __name__ == "__main__":
    main()
