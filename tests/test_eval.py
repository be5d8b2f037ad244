"""The perplexity harness against an independent plain loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmq.checkpoint import load_model
from llmq.data import eval_tokens
from llmq.eval import evaluate


def plain_perplexity(model_dir, text_path, seqlen):
    """Plain transformers + torch: read the file, tokenize once, score non-overlapping windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(open(text_path).read(), return_tensors="pt").input_ids
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(ids.shape[1] // seqlen):
            x = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(x).logits[0, :-1]
            nll += F.cross_entropy(logits.double(), x[0, 1:], reduction="sum").item()
            count += seqlen - 1
    return math.exp(nll / count)


def test_perplexity_matches_plain_loop(stories, tinystories_text):
    ref = plain_perplexity(stories, tinystories_text, 512)
    model, source = load_model(str(stories))
    tokens = eval_tokens(source.tokenizer(), str(tinystories_text))
    for batch in (1, 4):
        r = evaluate(model, tokens, 512, progress=False, batch_size=batch)
        assert abs(r.ppl - ref) / ref < 1e-4
        assert r.tokens_scored == r.windows * 511


def test_self_reference_has_zero_kl(stories, tinystories_text):
    model, source = load_model(str(stories))
    tokens = eval_tokens(source.tokenizer(), str(tinystories_text))[: 4 * 256]
    r = evaluate(model, tokens, 256, reference=model, progress=False)
    assert abs(r.kld) < 1e-6 and r.top1 == 1.0 and abs(r.reference_ppl - r.ppl) < 1e-9


def test_wikitext_rows_joined_with_blank_lines(stories):
    from conftest import WIKI_TEST, need

    import pandas as pd

    path = need(WIKI_TEST)
    _, source = load_model(str(stories))
    tok = source.tokenizer()
    rows = pd.read_parquet(path)["text"].tolist()
    expected = tok("\n\n".join(rows), return_tensors="pt").input_ids[0]
    assert torch.equal(eval_tokens(tok, str(path)), expected)


def test_per_window_nll_matches_plain_forward(stories, tinystories_text):
    """Per-window NLLs (for paired comparisons) are each window's own summed cross-entropy."""
    model, source = load_model(str(stories))
    tokens = eval_tokens(source.tokenizer(), str(tinystories_text))[: 5 * 128]
    r = evaluate(model, tokens, 128, reference=model, progress=False, batch_size=2, per_window=True)
    assert len(r.window_nll) == r.windows == 5 and r.reference_window_nll == r.window_nll
    with torch.no_grad():
        for i, got in enumerate(r.window_nll):
            x = tokens[i * 128 : (i + 1) * 128][None]
            want = F.cross_entropy(model(input_ids=x).logits[0, :-1].double(), x[0, 1:], reduction="sum").item()
            assert abs(got - want) < 1e-3 * abs(want)
    assert "window_nll" not in evaluate(model, tokens, 128, progress=False).to_dict()


def test_reference_log_probs_computed_once_give_the_same_numbers(stories, tinystories_text, tmp_path):
    """The report compares every variant with the FP32 model's log-probabilities computed once per dataset:
    the same KL, top-1 and reference perplexity as running the reference alongside each model."""
    from llmq.eval import ReferenceLogProbs

    reference, source = load_model(str(stories))
    model, _ = load_model(str(stories))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tokens = eval_tokens(source.tokenizer(), str(tinystories_text))[: 6 * 128]
    cached = ReferenceLogProbs(reference, tokens, 128, tmp_path / "ref.npy", batch_size=4, progress=False)
    a = evaluate(model, tokens, 128, reference=reference, progress=False, batch_size=4)
    b = evaluate(model, tokens, 128, reference=cached, progress=False, batch_size=4)
    assert (a.kld, a.top1, a.reference_ppl, a.ppl) == (b.kld, b.top1, b.reference_ppl, b.ppl) and a.kld > 0
