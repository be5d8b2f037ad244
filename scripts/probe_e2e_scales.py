"""Probe: how much end-to-end tuning of a quantized checkpoint's group scales lowers its KL.

EfficientQAT's second stage (E2E-QP, Chen et al. 2024): the integer codes stay as written, and only the
per-group scales are trained, through the whole model, here on the KL divergence from the unquantized
model's next-token distribution over the calibration windows.  The tuned scales are rounded to fp16 (what a
GPTQ file stores) before the evaluation, so the numbers are those of a file one could write.

The probe that led to llmq.tune (`llmq tune`, `tune_steps`); it now runs that module's training, and
evaluates each checkpoint before and after on the same windows without writing files (norms as --norms
says: off by default, as the probe first ran).  Integer grids (GPTQ / AWQ / compressed-tensors files).

    python scripts/probe_e2e_scales.py --model ../shared/assets/models/llmq-ref-6m \\
        --quantized q-w3 q-w2 --calib-dataset c4.jsonl --eval-dataset wikitext2.parquet --seqlen 256
"""

from __future__ import annotations

import argparse

from llmq.checkpoint import load_model, open_quantized
from llmq.data import calibration_tokens, eval_tokens
from llmq.eval.perplexity import evaluate
from llmq.tune import TuneOptions, student, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the unquantized model")
    ap.add_argument("--quantized", nargs="+", required=True, help="quantized checkpoints of it (GPTQ/AWQ/compressed-tensors)")
    ap.add_argument("--calib-dataset", required=True)
    ap.add_argument("--eval-dataset", required=True)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--norms", action="store_true", help="tune the norms' weights too (llmq tune does by default)")
    args = ap.parse_args()
    teacher, source = load_model(args.model)
    tok = source.tokenizer()
    ids = calibration_tokens(tok, args.calib_dataset, args.nsamples, args.seqlen, seed=0)
    text = eval_tokens(tok, args.eval_dataset)[: args.max_windows * args.seqlen]
    print("| checkpoint | mean KL before | after | ratio | top-1 before | after | perplexity before | after | tuning s |")
    print("|---|---|---|---|---|---|---|---|---|")
    options = TuneOptions(steps=args.steps, lr=args.lr, batch=args.batch, norms=args.norms)
    for path in args.quantized:
        s = student(*open_quantized(path), norms=args.norms)
        before = evaluate(s.model, text, args.seqlen, reference=teacher, progress=False, batch_size=8)
        seconds = tune(s, teacher, ids, options, progress=False).seconds
        after = evaluate(s.model, text, args.seqlen, reference=teacher, progress=False, batch_size=8)
        print(f"| {path} | {before.kld:.5f} | {after.kld:.5f} | {after.kld / before.kld:.2f}× | {100 * before.top1:.2f}% | "
              f"{100 * after.top1:.2f}% | {before.ppl:.2f} | {after.ppl:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
