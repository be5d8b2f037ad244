#!/usr/bin/env python
"""Is a quantized model's perplexity below the FP32 model's own a sign of accuracy, or of flatter predictions?

Evaluates the unquantized model with its logits divided by a temperature T (T > 1: flatter
distributions, the effect rounding noise tends to have) and, for each quantized checkpoint
given, its perplexity, mean entropy of its predictions and mean KL against the unquantized
model.  If the FP32 model itself gets a lower perplexity at some T > 1, a quantized model can
score below FP32 without being closer to it: KL divergence is then the measure to trust.

    python scripts/ppl_temperature.py --model ../shared/assets/models/llmq-ref-6m \
        --dataset ../shared/assets/datasets/wikitext-2-raw-v1/test-00000-of-00001.parquet --seqlen 256 \
        --quantized rtn-w4=/tmp/rtn-w4 gptq-w4=/tmp/gptq-w4
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.98, 1.0, 1.01, 1.02, 1.03, 1.05, 1.1])
    ap.add_argument("--quantized", nargs="*", default=[], metavar="NAME=DIR")
    ap.add_argument("--max-windows", type=int)
    args = ap.parse_args()

    from llmq.checkpoint import load_for_eval
    from llmq.data import eval_tokens

    ref, tok, _ = load_for_eval(args.model)
    ids = eval_tokens(tok, args.dataset).reshape(-1)
    windows = ids.numel() // args.seqlen
    if args.max_windows:
        windows = min(windows, args.max_windows)
    batches = ids[: windows * args.seqlen].reshape(windows, args.seqlen).split(8)
    quantized = {k: load_for_eval(v)[0] for k, v in (q.split("=", 1) for q in args.quantized)}

    temps = args.temperatures
    nll_t = dict.fromkeys(temps, 0.0)
    rows = {k: {"nll": 0.0, "ent": 0.0, "kl": 0.0} for k in quantized}
    ref_ent = 0.0
    n = 0
    for b in batches:
        tgt = b[:, 1:, None]
        logits = ref(input_ids=b, use_cache=False).logits[:, :-1].float()
        for t in temps:
            nll_t[t] -= F.log_softmax(logits / t, -1).gather(2, tgt).sum().item()
        ref_lp = F.log_softmax(logits, -1)
        ref_ent -= (ref_lp.exp() * ref_lp).sum().item()
        for k, m in quantized.items():
            lp = F.log_softmax(m(input_ids=b, use_cache=False).logits[:, :-1].float(), -1)
            rows[k]["nll"] -= lp.gather(2, tgt).sum().item()
            rows[k]["ent"] -= (lp.exp() * lp).sum().item()
            rows[k]["kl"] += (ref_lp.exp() * (ref_lp - lp)).sum().item()
        n += tgt.numel()

    print(f"{windows} windows of {args.seqlen} tokens, {n} tokens scored\n")
    print("| FP32 logits / T | perplexity |\n|---|---|")
    for t in temps:
        print(f"| {t:g} | {math.exp(nll_t[t] / n):.4f} |")
    print("\n| model | perplexity | mean entropy (nats) | mean KL vs FP32 |\n|---|---|---|---|")
    print(f"| FP32 | {math.exp(nll_t[1.0] / n) if 1.0 in nll_t else float('nan'):.4f} | {ref_ent / n:.4f} | 0 |")
    for k, r in rows.items():
        print(f"| {k} | {math.exp(r['nll'] / n):.4f} | {r['ent'] / n:.4f} | {r['kl'] / n:.5f} |")


if __name__ == "__main__":
    main()
