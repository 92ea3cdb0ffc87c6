"""llama.cpp must tokenize a converted model exactly as the source tokenizer does."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from dymoe_gguf.bundle import Tier
from dymoe_gguf.cli import cli
from dymoe_gguf.convert import convert

# Public domain (Lewis Carroll, Alice's Adventures in Wonderland, 1865).
CORPUS = """Alice was beginning to get very tired of sitting by her sister on the bank, and of having
nothing to do: once or twice she had peeped into the book her sister was reading, but it had no
pictures or conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or
conversations?' So she was considering in her own mind (as well as she could, for the hot day made
her feel very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the
trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close
by her. There was nothing so VERY remarkable in that; nor did Alice think it so VERY much out of the
way to hear the Rabbit say to itself, 'Oh dear! Oh dear! I shall be late!' In 1865, 42 copies cost
£3.50 each — naïve café owners didn't mind. Numbers: 3.14159, 1,000,000 and 2024-11-23.
"""
SAMPLES = [
    "Hello world",
    " leading space and  double  spaces",
    "Alice's sister wasn't reading; they'd gone.\nNew line\n\n\ttab",
    "Ünïcödé — “quotes” 12345 6789 3.14 x=y+z",
    "The White Rabbit ran close by her, 'Oh dear!'",
    "",
]


def _llama_ids(model_path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


def _bpe(tmp_path, pre_tokenizer) -> tokenizers.Tokenizer:  # noqa: F821
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return tok


def _bundle_with_tokenizer(tmp_path, hf_model, write) -> object:
    src = tmp_path / "src"
    shutil.copytree(hf_model("qwen3moe"), src)
    write(src)
    out = tmp_path / "b"
    convert(src, out, base_tier=Tier.Q8_0, tiers=(Tier.Q2_K,), threads=2)
    return out / "model.gguf"


@pytest.mark.parametrize("split", ["qwen2", "gpt-2"])
def test_custom_bpe_vocab_matches_tokenizers(tmp_path, hf_model, split):
    from tokenizers import Regex, pre_tokenizers

    from dymoe_gguf.synth import byte_bpe_tokenizer

    if split == "qwen2":
        regex = byte_bpe_tokenizer()["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = _bpe(tmp_path, pre)
    gguf_path = _bundle_with_tokenizer(tmp_path, hf_model, lambda d: tok.save(str(d / "tokenizer.json")))
    for text in SAMPLES + [CORPUS]:
        assert _llama_ids(gguf_path, text) == tok.encode(text).ids, text


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path, hf_model):
    src = tmp_path / "src"
    shutil.copytree(hf_model("qwen3moe"), src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|[^\w\s]+"
    (src / "tokenizer.json").write_text(json.dumps(tj))
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code != 0 and "pre-tokenizer" in res.output and "qwen2" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra_ws", [False, True])
def test_sentencepiece_model_matches_sentencepiece(tmp_path, hf_model, extra_ws):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 3)

    def write(d):
        (d / "tokenizer.json").unlink()
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
            byte_fallback=True, split_digits=True, remove_extra_whitespaces=extra_ws,
            normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        (d / "tokenizer.vocab").unlink()
        (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                             "eos_token": "</s>", "unk_token": "<unk>"}))

    gguf_path = _bundle_with_tokenizer(tmp_path, hf_model, write)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "src" / "tokenizer.model"))
    for text in SAMPLES + [CORPUS]:
        if extra_ws and ("  " in text or "\n" in text or "\t" in text or text.startswith(" ")):
            continue  # sentencepiece collapses whitespace there; llama.cpp does not (converter warns)
        assert _llama_ids(gguf_path, text) == sp.encode(text), text
