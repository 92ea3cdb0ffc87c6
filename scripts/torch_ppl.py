"""PyTorch perplexity of an HF checkpoint with llama-perplexity's protocol (needs torch and transformers).

    python scripts/torch_ppl.py models/tiny-moe --text data/heldout.txt --ctx 256 [--chunks N]

Run it with any python that has torch, transformers and sentencepiece (the project's .venv has no
torch; e.g. ``python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch transformers
sentencepiece``). Reads the text's bytes less one trailing newline (as llama.cpp's ``-f`` does),
tokenizes them once with the model's SentencePiece tokenizer, with BOS in front when
tokenizer_config.json says ``add_bos_token`` (the default), cuts the tokens into chunks of ``ctx``,
replaces each chunk's first token with BOS, and scores the second half of each chunk (logits at
positions ctx/2 .. ctx-2 predicting the next token) — what ``llama-perplexity`` and ``dymoe-gguf
eval`` do, so the numbers are comparable. Prints JSON.
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
    cfg_path = args.model / "tokenizer_config.json"
    add_bos = json.loads(cfg_path.read_text()).get("add_bos_token", True) if cfg_path.is_file() else True
    data = args.text.read_bytes()
    data = data[:-1] if data.endswith(b"\n") else data
    toks = ([sp.bos_id()] if add_bos else []) + sp.encode(data.decode("utf-8"))
    n = len(toks) // args.ctx
    if args.chunks:
        n = min(n, args.chunks)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    first, nll, count = args.ctx // 2, 0.0, 0
    with torch.no_grad():
        for i in range(n):
            chunk = toks[i * args.ctx:(i + 1) * args.ctx]
            if add_bos:
                chunk[0] = sp.bos_id()
            logits = model(torch.tensor([chunk])).logits[0, first:args.ctx - 1].double()
            target = torch.tensor(chunk[first + 1:args.ctx])
            nll -= torch.log_softmax(logits, -1)[torch.arange(len(target)), target].sum().item()
            count += len(target)
    protocol = "llama-perplexity (BOS before the text and at each chunk's start, second half scored)"
    print(json.dumps({"ppl": math.exp(nll / count), "tokens": count, "chunks": n, "ctx": args.ctx,
                      "text": args.text.name, "protocol": protocol}))


if __name__ == "__main__":
    main()
