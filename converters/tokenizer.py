"""Tokenizer -> GGUF keys, so llama.cpp tokenizes exactly as the source tokenizer does.

* ``tokenizer.model`` (SentencePiece) -> ``tokenizer.ggml.model = "llama"``.
* ``tokenizer.json`` with a byte-level BPE model -> ``"gpt2"``; the pre-tokenizer llama.cpp must use
  is recognised from the regexes the tokenizer *declares* (its ``pre_tokenizer`` section), not
  from a hash of known vocabularies, so custom vocabularies with a standard split work.
* ``tokenizer.json`` with a SentencePiece-style BPE (byte fallback, no byte-level) -> ``"llama"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from dymoe_gguf.errors import SourceError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp pre-tokenizer name -> the regex sequence a tokenizer.json declares for it
# (regexes as written in tokenizer.json; llama-vocab.cpp holds the adapted forms).
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (_GPT2,): "gpt-2",
    (r"\p{N}", _GPT2): "starcoder",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
     r"|\s*[\r\n]+|\s+(?!\S)|\s+",): "llama-bpe",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
     r"|\s*[\r\n]+|\s+(?!\S)|\s+",): "qwen2",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
     r"|\s*[\r\n]+|\s+(?!\S)|\s+",): "qwen35",
}


def declared_regexes(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """The split regexes a tokenizer.json ``pre_tokenizer`` applies, in order."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(r for p in pre.get("pretokenizers", []) for r in declared_regexes(p))
    if kind == "Split":
        pattern = pre.get("pattern", {})
        if "Regex" not in pattern:
            raise SourceError(f"Unsupported tokenizer: Split pre-tokenizer without a regex ({pattern})")
        return (pattern["Regex"],)
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise SourceError("Unsupported tokenizer: ByteLevel pre-tokenizer with add_prefix_space")
        return (_GPT2,) if pre.get("use_regex", True) else ()
    if kind == "Digits":
        return (r"\p{N}",) if pre.get("individual_digits") else (r"\p{N}+",)
    raise SourceError(f"Unsupported tokenizer: pre-tokenizer type {kind!r}")


def recognise_pre(tok: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json."""
    regexes = declared_regexes(tok.get("pre_tokenizer"))
    if regexes in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[regexes]
    raise SourceError("Unsupported tokenizer: its pre-tokenizer split "
                      f"{list(regexes)!r} matches none llama.cpp implements "
                      f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))})")


def _write_bpe(w: gguf.GGUFWriter, tok: dict[str, Any], vocab_size: int) -> None:
    model = tok["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    id_to_tok = {i: t for t, i in vocab.items()} | {a["id"]: c for c, a in added.items()}
    n = max(vocab_size, max(id_to_tok) + 1)
    tokens, types = [], []
    for i in range(n):
        t = id_to_tok.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(recognise_pre(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    # GGUFWriter.add_array skips empty arrays, but llama.cpp requires the key for gpt2 vocabularies
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)


def _write_spm(w: gguf.GGUFWriter, path: Path, vocab_size: int) -> None:
    try:
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
        raise SourceError(f"Reading tokenizer.model needs sentencepiece and protobuf: {exc}") from None
    try:
        sp = SentencePieceProcessor(model_file=str(path))
        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise SourceError(f"Corrupt tokenizer.model: {str(exc).splitlines()[0]}") from None
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM=1, BPE=2
        raise SourceError("Unsupported tokenizer.model: only unigram/BPE SentencePiece models")
    n = max(vocab_size, sp.vocab_size())
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif proto.pieces[i].type == 4:  # USER_DEFINED
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for i in range(sp.vocab_size(), n):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    ns = proto.normalizer_spec
    if ns.remove_extra_whitespaces or (ns.name and ns.name != "identity"):
        # llama.cpp applies no normalisation to SentencePiece input: it keeps runs of spaces and
        # does not NFKC-fold, so such text tokenizes differently from the source tokenizer.
        import logging

        logging.getLogger(__name__).warning(
            "tokenizer.model normalises input (rule %r, remove_extra_whitespaces=%s); llama.cpp does not, "
            "so text with runs of whitespace, newlines or compatibility characters tokenizes differently",
            ns.name, ns.remove_extra_whitespaces)


def write_tokenizer(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> str:
    """Write tokenizer keys for the HF directory ``model_dir``; returns the kind written."""
    spm = model_dir / "tokenizer.model"
    tj = model_dir / "tokenizer.json"
    kind: str
    if spm.is_file():
        _write_spm(w, spm, vocab_size)
        kind = "sentencepiece"
    elif tj.is_file():
        try:
            tok = json.loads(tj.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"Invalid tokenizer.json: {exc}") from None
        model = tok.get("model", {})
        if model.get("type") != "BPE":
            raise SourceError(f"Unsupported tokenizer.json model type {model.get('type')!r} (expected BPE)")
        if model.get("byte_fallback"):  # SentencePiece-style BPE stored as tokenizer.json
            vocab = gguf.vocab.LlamaHfVocab(model_dir)
            toks, scores, types = zip(*vocab.all_tokens())
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_list(list(toks))
            w.add_token_scores(list(scores))
            w.add_token_types(list(types))
            kind = "bpe-spm"
        else:
            _write_bpe(w, tok, vocab_size)
            kind = "bpe"
    else:
        raise SourceError(f"No tokenizer in {model_dir}: expected tokenizer.json or tokenizer.model")
    # gguf's SpecialVocab reads these too (special tokens, chat template): a broken one is a clear error here
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "special_tokens_map.json"):
        f = model_dir / name
        if f.is_file():
            try:
                if not isinstance(json.loads(f.read_text(encoding="utf-8")), dict):
                    raise ValueError("expected a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                raise SourceError(f"Invalid {name} in {model_dir}: {str(exc).splitlines()[0]}") from None
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
        special.add_to_gguf(w, quiet=True)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise SourceError(f"Cannot read the special tokens or chat template in {model_dir}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return kind
