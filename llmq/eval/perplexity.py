"""Perplexity over non-overlapping windows, and KL divergence / top-1 agreement against a reference.

Protocol (GPTQ paper): the evaluation text is tokenized once, cut into
``len // seqlen`` non-overlapping windows (the tail shorter than a window is dropped),
and in every window each token after the first is scored from its prefix.
Perplexity is exp of the mean negative log-likelihood over all scored tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmq.errors import LlmqError


@dataclass
class EvalResult:
    seqlen: int
    windows: int
    tokens_scored: int
    nll: float
    ppl: float
    kld: float | None = None  # mean KL(reference || model) per scored token, nats
    top1: float | None = None  # fraction of scored tokens where both models' argmax agree
    reference_ppl: float | None = None
    # Summed NLL of each window (model, and reference when given), for paired comparisons of two
    # models on the same windows; only filled when asked for (``per_window=True``).
    window_nll: list[float] | None = None
    reference_window_nll: list[float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.window_nll is None:
            del d["window_nll"], d["reference_window_nll"]
        return d


def _exp(x: float) -> float:
    """exp, inf past float range (a model whose loss overflows has an infinite perplexity, not a crash)."""
    return math.exp(x) if x < 709 else math.inf


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[:, :-1].float()


def _windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    tokens = tokens.reshape(-1)
    windows = tokens.numel() // seqlen
    if windows == 0:
        raise LlmqError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    return tokens[: windows * seqlen].reshape(windows, seqlen)


class ReferenceLogProbs:
    """A reference model's log-probabilities over the evaluation windows, computed once and kept in a
    file (windows x (seqlen-1) x vocab, fp32), so that many models are compared against it without
    running the reference again.  The numbers are the very ones ``evaluate`` computes from the model."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, seqlen: int, path: Path, *, device: str = "cpu",
                 batch_size: int = 1, progress: bool = True):
        import numpy as np

        ids = _windows(tokens, seqlen)
        self.seqlen = seqlen
        vocab = model.get_output_embeddings().weight.shape[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.logp = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(ids), seqlen - 1, vocab))
        with torch.no_grad(), tqdm(total=len(ids), desc="reference", unit="window", disable=not progress,
                                   dynamic_ncols=True) as bar:
            for start in range(0, len(ids), batch_size):
                batch = ids[start : start + batch_size].to(device)
                self.logp[start : start + len(batch)] = F.log_softmax(_logits(model, batch), dim=-1).cpu().numpy()
                bar.update(len(batch))
        self.logp.flush()
        self.ids = ids

    def of(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(self.logp[start:stop])


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, seqlen: int, reference: nn.Module | ReferenceLogProbs | None = None,
             device: str = "cpu", progress: bool = True, batch_size: int = 1, per_window: bool = False) -> EvalResult:
    """``batch_size`` windows go through the model at once (same numbers, better throughput).
    ``reference``: a model, or its log-probabilities over these windows computed once (ReferenceLogProbs)."""
    ids = _windows(tokens, seqlen)
    windows = len(ids)
    if isinstance(reference, ReferenceLogProbs) and not torch.equal(reference.ids, ids):
        raise ValueError("the reference log-probabilities were computed on other windows")
    batches = ids.split(batch_size)
    nll_sum = ref_nll_sum = kl_sum = 0.0
    agree = 0
    scored = 0
    window_nll: list[float] = []
    ref_window_nll: list[float] = []
    with tqdm(total=windows, desc="eval", unit="window", disable=not progress, dynamic_ncols=True) as bar:
        for b, ids in enumerate(batches):
            ids = ids.to(device)
            targets = ids[:, 1:, None]
            logp = F.log_softmax(_logits(model, ids), dim=-1)
            nll = -logp.gather(2, targets)[..., 0].sum(1)
            nll_sum += nll.sum().item()
            if per_window:
                window_nll += nll.tolist()
            scored += targets.numel()
            if reference is not None:
                if isinstance(reference, ReferenceLogProbs):
                    ref_logp = reference.of(b * batch_size, b * batch_size + len(ids)).to(device)
                else:
                    ref_logp = F.log_softmax(_logits(reference, ids), dim=-1)
                ref_nll = -ref_logp.gather(2, targets)[..., 0].sum(1)
                ref_nll_sum += ref_nll.sum().item()
                if per_window:
                    ref_window_nll += ref_nll.tolist()
                kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            bar.update(ids.shape[0])
    nll = nll_sum / scored
    result = EvalResult(seqlen=seqlen, windows=windows, tokens_scored=scored, nll=nll, ppl=_exp(nll))
    if per_window:
        result.window_nll = window_nll
        result.reference_window_nll = ref_window_nll if reference is not None else None
    if reference is not None:
        result.kld = kl_sum / scored
        result.top1 = agree / scored
        result.reference_ppl = _exp(ref_nll_sum / scored)
    return result
