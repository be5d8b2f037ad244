"""GPTQ/AWQ-calibrated bitsandbytes checkpoints against bitsandbytes' own quantization, all run by bitsandbytes.

Every variant is loaded with transformers' from_pretrained (bitsandbytes' Linear4bit / Linear8bitLt layers, its
own dequantization kernels) and compared with the FP32 model on the same windows (mean KL, top-1, perplexity);
"bitsandbytes" rows are transformers quantizing the FP32 model itself at load (load_in_4bit / load_in_8bit),
saved to measure their size.  Needs bitsandbytes.

    python scripts/compare_bnb.py --model ../shared/assets/models/llmq-ref-6m \
        --calib ../shared/assets/datasets/c4-sample/c4_sample_200docs.jsonl \
        --eval ../shared/assets/datasets/wikitext-2-raw-v1/test-00000-of-00001.parquet --seqlen 256 --max-windows 100
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {  # name -> (bitsandbytes' own config, or llmq's method and flags)
    "bitsandbytes NF4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "llmq RTN NF4": ("rtn", ["--bits", "4"]),
    "llmq AWQ NF4": ("awq", ["--bits", "4"]),
    "llmq GPTQ NF4": ("gptq", ["--bits", "4"]),
    "bitsandbytes NF4 double-quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "llmq GPTQ NF4 double-quant": ("gptq", ["--bits", "4", "--bnb-double-quant"]),
    "bitsandbytes FP4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "llmq GPTQ FP4": ("gptq", ["--bits", "4", "--bnb-type", "fp4"]),
    "bitsandbytes LLM.int8": {"load_in_8bit": True},
    "llmq GPTQ LLM.int8": ("gptq", ["--bits", "8"]),
}


def size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--run-with", choices=["bitsandbytes", "llmq"], default="bitsandbytes",
                    help="run every checkpoint with bitsandbytes' layers, or dequantized by llmq's reader (for shapes "
                         "bitsandbytes' CPU kernels refuse; tests/test_bnb.py checks the two dequantize alike)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmq.checkpoint import load_model
    from llmq.cli import main as llmq
    from llmq.data import eval_tokens
    from llmq.eval import evaluate
    from llmq.source import ModelSource

    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokens = eval_tokens(ModelSource(args.model).tokenizer(), args.eval)[: args.max_windows * args.seqlen]
    print(f"# {Path(args.model).name}: bitsandbytes checkpoints against the FP32 model\n\n"
          f"Command: `python {shlex.join(sys.argv)}`\n\n"
          f"Run with: {args.run_with}.\n\n"
          "| variant | file MiB | mean KL | top-1 | ppl | quantize s |\n|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, how in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "-")
            t0 = time.perf_counter()
            if isinstance(how, dict):
                q = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
                    bnb_4bit_compute_dtype=torch.float32, **how))
                q.save_pretrained(out)
            else:
                method, flags = how
                with contextlib.redirect_stdout(io.StringIO()):  # (its own report of the run)
                    code = llmq(["quantize", "--quiet", "--method", method, "--format", "bitsandbytes", *flags, "--dtype", "float32",
                                 "--model", args.model, "--dataset", args.calib, "--nsamples", str(args.nsamples),
                                 "--seqlen", str(args.seqlen), "--out", str(out)])
                assert code == 0, name
            seconds = time.perf_counter() - t0
            model = AutoModelForCausalLM.from_pretrained(out).eval() if args.run_with == "bitsandbytes" else load_model(str(out))[0]
            r = evaluate(model, tokens, args.seqlen, reference=reference, progress=False, batch_size=8)
            print(f"| {name} | {size(out) / 2**20:.2f} | {r.kld:.6f} | {100 * r.top1:.2f}% | {r.ppl:.4f} | {seconds:.1f} |", flush=True)
            del model
    print(f"\nFP32 perplexity {r.reference_ppl:.4f}; {r.windows} windows of {args.seqlen}.")


if __name__ == "__main__":
    main()
