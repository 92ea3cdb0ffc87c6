"""The shipped trained model (models/tiny-moe): converts, tokenizes like its source, and llama.cpp's
full-precision perplexity matches the PyTorch value recorded beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dymoe_gguf.bundle import Tier

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-moe"
HELDOUT = ROOT / "data" / "heldout.txt"

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="models/tiny-moe is not in this checkout")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    from dymoe_gguf.convert import convert

    out = tmp_path_factory.mktemp("shipped") / "tiny.dymoe"
    convert(MODEL, out, base_tier=Tier.F32, tiers=(Tier.Q2_K, Tier.Q4_K, Tier.Q8_0), threads=2)
    return out


def test_tokenizes_like_sentencepiece(shipped):
    import sentencepiece as spm
    from llama_cpp import Llama

    sp = spm.SentencePieceProcessor(model_file=str(MODEL / "tokenizer.model"))
    text = HELDOUT.read_text(encoding="utf-8")[:20000]
    llm = Llama(model_path=str(shipped / "model.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == sp.encode(text)
    finally:
        llm.close()


def test_full_precision_ppl_matches_pytorch(shipped):
    from dymoe_gguf.quality.eval import evaluate

    rec = json.loads((MODEL / "eval.json").read_text())["llama_perplexity_protocol"]
    res = evaluate(shipped, HELDOUT, ctx=rec["ctx"], max_chunks=rec["chunks"])
    assert res.tokens == rec["tokens"]
    assert abs(res.ppl - rec["ppl"]) / rec["ppl"] < 0.001, (res.ppl, rec["ppl"])  # same protocol: 4e-6 measured


def test_kl_grows_as_tiers_shrink(shipped):
    from dymoe_gguf.quality.eval import evaluate

    r = {t: evaluate(shipped, HELDOUT, ctx=256, max_chunks=4, policy=f"uniform:{t}", lookahead=0)
         for t in ("Q8_0", "Q4_K", "Q2_K")}
    assert r["Q8_0"].kl_mean < r["Q4_K"].kl_mean < r["Q2_K"].kl_mean
    assert r["Q8_0"].top1 > r["Q2_K"].top1
