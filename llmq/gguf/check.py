"""Does llama.cpp compute what the HF model computes?  `llmq check-gguf FILE --model DIR`.

Two questions, answered separately so that a difference can be placed:
  tokenizer  llama.cpp's tokenization of the text (from the file alone) against the HF tokenizer's
  function   on the HF tokenizer's windows, llama.cpp's logits against transformers': perplexity of both,
             mean KL(HF || llama.cpp) and top-1 agreement (the numbers `llmq eval` reports)
Needs llama-cpp-python (`pip install llmq[llamacpp]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from llmq.checkpoint import load_model
from llmq.data import load_rows
from llmq.errors import LlmqError
from llmq.eval.perplexity import EvalResult, evaluate


@dataclass
class TokenizerCheck:
    hf_tokens: int
    llama_cpp_tokens: int
    first_difference: int | None  # index of the first differing token; None: identical

    @property
    def agrees(self) -> bool:
        return self.first_difference is None


class LlamaCppModel:
    """llama.cpp running a GGUF file, called like a transformers causal LM (logits for each window)."""

    def __init__(self, path: Path, seqlen: int):
        try:
            import llama_cpp
        except ImportError:
            raise LlmqError("check-gguf runs llama.cpp: install llama-cpp-python (pip install llmq[llamacpp])") from None
        if not path.is_file():
            raise LlmqError(f"GGUF file {str(path)!r} does not exist")
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, logits_all=True, verbose=False)

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        rows = []
        for row in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)


def check_tokenizer(cpp: LlamaCppModel, tokenizer, text: str) -> TokenizerCheck:
    want = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    got = cpp.tokenize(text, add_bos=bos is not None and want[:1] == [bos])
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if first is None and len(want) != len(got):
        first = min(len(want), len(got))
    return TokenizerCheck(len(want), len(got), first)


def check_gguf(gguf_file: str | Path, model: str, dataset: str = "wikitext2", split: str | None = None,
               seqlen: int | None = None, max_windows: int | None = None,
               progress: bool = True) -> tuple[TokenizerCheck, EvalResult]:
    hf, source = load_model(model)
    tokenizer = source.tokenizer()
    context = getattr(source.config, "max_position_embeddings", None) or 2048
    seqlen = seqlen or min(2048, context)
    text = "\n\n".join(load_rows(dataset, split, purpose="eval"))
    cpp = LlamaCppModel(Path(gguf_file), seqlen)
    tokens = check_tokenizer(cpp, tokenizer, text)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    if max_windows:
        ids = ids[: max_windows * seqlen]
    return tokens, evaluate(cpp, ids, seqlen, reference=hf, progress=progress)
