"""The tokenizer of a GGUF file (tokenizer.ggml.*), read from a model directory's tokenizer files."""

from __future__ import annotations

from pathlib import Path

from llmq.errors import LlmqError


def load_vocab(model_dir: Path):
    """The tokenizer as gguf describes it; a clear error when it cannot (checked before any work)."""
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    errors = []
    for cls in (LlamaHfVocab, SentencePieceVocab, BpeVocab):
        try:
            return cls(model_dir)
        except Exception as e:  # each class refuses tokenizers it does not describe
            errors.append(f"{cls.__name__}: {e}")
    raise LlmqError(f"cannot describe the tokenizer of {str(model_dir)!r} in GGUF ({'; '.join(errors)})")


# llama.cpp picks its pre-tokenizer (the regex splitting text before BPE) by this name.
PRE_TOKENIZER = {"qwen2": "qwen2", "qwen3": "qwen2", "gpt2": "gpt-2"}


def add_tokenizer(w, model_dir: Path, vocab_size: int, model_type: str = "llama") -> None:
    """tokenizer.ggml.*: SentencePiece-style (llama) or GPT-2-style BPE tables, and special tokens."""
    from gguf.vocab import SpecialVocab

    vocab = load_vocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) != vocab_size:
        raise LlmqError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    w.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        w.add_tokenizer_pre(PRE_TOKENIZER.get(model_type, "default"))
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(w)
