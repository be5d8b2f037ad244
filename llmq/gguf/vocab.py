"""The tokenizer of a GGUF file (tokenizer.ggml.*), so that llama.cpp splits text as the HF tokenizer does.

llama.cpp tokenizes by the file alone, so everything the HF tokenizer does must be spelled out:
  SentencePiece-style ("llama")  tokens with their scores (llama.cpp merges the best-scored pair first),
                                 byte tokens, and whether a space is put before the text (add_space_prefix)
  byte-level BPE ("gpt2")        tokens, merges, and the pre-tokenizer (the regex splitting text before BPE),
                                 named as llama.cpp names it
and for both, whether a BOS/EOS token is added.  Scores come from tokenizer.model when sentencepiece
can read it, else from the merge ranks of tokenizer.json (never a placeholder: equal scores make
llama.cpp merge left to right, which is another tokenizer).  A tokenizer shorter than the embedding is
padded with unused tokens, as convert_hf_to_gguf pads; one llama.cpp cannot reproduce is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmq.errors import LlmqError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
SPACE = "\u2581"  # SentencePiece's visible space

# llama.cpp's name for each regex a byte-level BPE tokenizer splits text with (as tokenizer.json spells it).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
SPLIT_REGEXES = {
    _LLAMA3_REGEX: "llama-bpe",
    _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",  # Qwen2/2.5/3: single digits
}


@dataclass
class Tokenizer:
    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    pre: str | None = None  # byte-level BPE: llama.cpp's pre-tokenizer
    add_space_prefix: bool | None = None  # SentencePiece-style: a space before the text


def read_tokenizer(model_dir: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer of a model directory as llama.cpp needs it; a clear error when it cannot (checked before any work)."""
    tj = _tokenizer_json(model_dir)
    if tj is not None and _byte_level(tj):
        tok = _byte_level_bpe(tj)
    elif (model_dir / "tokenizer.model").is_file() and (tj is None or _spm_like(tj)):
        tok = _sentencepiece(model_dir)
    elif tj is not None and _spm_like(tj):
        tok = _spm_from_merges(tj)
    else:
        raise LlmqError(f"cannot describe the tokenizer of {str(model_dir)!r} in GGUF: neither a SentencePiece model "
                        "nor a byte-level BPE tokenizer.json")
    _apply_added_tokens(tok, model_dir, tj)
    if len(tok.tokens) > vocab_size:
        raise LlmqError(f"the tokenizer has {len(tok.tokens)} tokens but the model's vocab_size is {vocab_size}")
    for i in range(len(tok.tokens), vocab_size):  # rows of the embedding no token uses
        tok.tokens.append(f"[PAD{i}]")
        tok.types.append(UNUSED)
        if tok.scores is not None:
            tok.scores.append(-1000.0)
    if tok.model == "llama":
        tok.add_space_prefix = _adds_space_prefix(model_dir, tj)
    return tok


def _tokenizer_json(model_dir: Path) -> dict[str, Any] | None:
    p = model_dir / "tokenizer.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlmqError(f"cannot read {p}: {e}") from None


def _pre_tokenizers(tj: dict[str, Any]) -> list[dict[str, Any]]:
    pre = tj.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []


def _byte_level(tj: dict[str, Any]) -> bool:
    return tj["model"].get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(tj))


def _spm_like(tj: dict[str, Any]) -> bool:
    """A tokenizer.json converted from SentencePiece: BPE over characters with byte fallback, spaces as U+2581."""
    return tj["model"].get("type") == "BPE" and tj["model"].get("byte_fallback", False)


def _vocab_by_id(tj: dict[str, Any]) -> list[str]:
    vocab = tj["model"]["vocab"]
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    return tokens


def _byte_level_bpe(tj: dict[str, Any]) -> Tokenizer:
    tokens = _vocab_by_id(tj)
    return Tokenizer("gpt2", tokens, [NORMAL] * len(tokens), pre=_pre_name(tj))


def _pre_name(tj: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer for this tokenizer.json's pre_tokenizer (the same splits, the same regex)."""
    steps = _pre_tokenizers(tj)
    kinds = [p.get("type") for p in steps]
    level = next(p for p in steps if p.get("type") == "ByteLevel")
    if level.get("add_prefix_space"):
        raise LlmqError("the tokenizer puts a space before the text (ByteLevel add_prefix_space); llama.cpp's BPE does not")
    if kinds == ["ByteLevel"] and level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and level.get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not level.get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEXES and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return SPLIT_REGEXES[regex]
    raise LlmqError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one llama.cpp reproduces")


def _sentencepiece(model_dir: Path) -> Tokenizer:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise LlmqError("reading tokenizer.model needs the sentencepiece package") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise LlmqError(f"cannot read {model_dir / 'tokenizer.model'}: {e}") from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                     else BYTE if sp.IsByte(i) else NORMAL)
    return Tokenizer("llama", tokens, types, scores)


def _spm_from_merges(tj: dict[str, Any]) -> Tokenizer:
    """SentencePiece-style tables from a converted tokenizer.json: llama.cpp merges the pair whose result
    scores best, so each token scores minus the rank of the merge that first makes it."""
    tokens = _vocab_by_id(tj)
    rank: dict[str, int] = {}
    for r, merge in enumerate(tj["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    unk = tj["model"].get("unk_token")
    types = [UNKNOWN if t == unk else BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else NORMAL for t in tokens]
    scores = [-1.0 - rank[t] if t in rank else 0.0 for t in tokens]
    return Tokenizer("llama", tokens, types, scores)


def _apply_added_tokens(tok: Tokenizer, model_dir: Path, tj: dict[str, Any] | None) -> None:
    """Added tokens (tokenizer.json, added_tokens.json, tokenizer_config.json's decoder): special ones are
    CONTROL (never produced from text), the others USER_DEFINED (matched whole, before BPE)."""
    added: dict[int, tuple[str, bool]] = {}
    if tj is not None:
        added.update({a["id"]: (a["content"], bool(a.get("special"))) for a in tj.get("added_tokens", [])})
    cfg_file = model_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            decoder = json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        except ValueError:
            decoder = {}
        added.update({int(i): (a["content"], bool(a.get("special"))) for i, a in decoder.items()})
    for i, (text, special) in sorted(added.items()):
        while len(tok.tokens) <= i:
            tok.tokens.append(f"[PAD{len(tok.tokens)}]")
            tok.types.append(UNUSED)
            if tok.scores is not None:
                tok.scores.append(-1000.0)
        if tok.model == "llama" and tok.types[i] in (CONTROL, UNKNOWN, BYTE) and tok.tokens[i] == text:
            continue  # the SentencePiece model's own special pieces keep their kind
        tok.tokens[i] = text
        tok.types[i] = CONTROL if special else USER_DEFINED
        if tok.scores is not None:
            tok.scores[i] = -1000.0


def _adds_space_prefix(model_dir: Path, tj: dict[str, Any] | None) -> bool:
    """Whether the HF tokenizer puts a space before the text (Llama 2: yes; Gemma: no)."""
    if tj is not None:
        norm = tj.get("normalizer") or {}
        steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        if any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps):
            return True
        meta = [p for p in _pre_tokenizers(tj) if p.get("type") == "Metaspace"]
        if meta:
            return meta[0].get("prepend_scheme", "always" if meta[0].get("add_prefix_space", True) else "never") != "never"
        return False
    from sentencepiece import SentencePieceProcessor  # (read above: tokenizer.model exists)

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    return sp.EncodeAsPieces("a")[0].startswith(SPACE)


def special_tokens(model_dir: Path) -> tuple[bool | None, bool | None]:
    """(adds BOS, adds EOS) as the HF tokenizer itself does, found by tokenizing a word."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # no loadable tokenizer: the tables above say all llama.cpp needs
        return None, None
    ids = hf("a")["input_ids"]
    bos, eos = hf.bos_token_id, hf.eos_token_id
    return (bos is not None and ids[:1] == [bos]), (eos is not None and len(ids) > 1 and ids[-1] == eos)


def load_vocab(model_dir: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer tables, or a clear error (called before any work)."""
    return read_tokenizer(model_dir, vocab_size)


def add_tokenizer(w, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.*: the tables above, the special token ids and chat template (gguf's SpecialVocab), and
    whether BOS/EOS are added, as the HF tokenizer adds them."""
    from gguf.vocab import SpecialVocab

    tok = read_tokenizer(model_dir, vocab_size)
    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre or "default")
    w.add_token_list(tok.tokens)
    if tok.scores is not None:
        w.add_token_scores(tok.scores)
    w.add_token_types(tok.types)
    if tok.add_space_prefix is not None:
        w.add_add_space_prefix(tok.add_space_prefix)
    special = SpecialVocab(model_dir, load_merges=tok.model == "gpt2", n_vocab=len(tok.tokens))
    bos, eos = special_tokens(model_dir)
    if bos is not None:
        special.add_special_token.update(bos=bos, eos=eos)
    special.add_to_gguf(w)
