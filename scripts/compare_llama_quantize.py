"""llmq's GGUF files against llama.cpp's own quantizer (llama-quantize) on the same model and text.

llama.cpp quantizes llmq's F32 GGUF of the model (the library call behind `llama-quantize`, through
llama-cpp-python, no importance matrix); llmq writes RTN and GPTQ files of the same type.  All are
read back by transformers' GGUF loader and scored on the same tokens against the FP32 model: KL
divergence, top-1 agreement, perplexity, file size.  Needs `pip install -e .[llamacpp]`.

    python scripts/compare_llama_quantize.py --model ../shared/assets/models/llmq-ref-6m --seqlen 256 \
        --eval ../shared/assets/datasets/wikitext-2-raw-v1/test-00000-of-00001.parquet --max-windows 300 \
        --calib ../shared/assets/datasets/wikitext-2-raw-v1/validation-00000-of-00001.parquet --nsamples 64
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path

# llama.cpp's file types (enum llama_ftype) for the types compared here
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--eval", required=True, help="evaluation text (dataset spec)")
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--calib", default=None, help="GPTQ calibration text (default: the method's)")
    ap.add_argument("--nsamples", type=int, default=128)
    args = ap.parse_args()

    import llama_cpp
    import torch

    from llmq.checkpoint import load_for_eval, load_model
    from llmq.recipe import build_config
    from llmq.data import eval_tokens
    from llmq.eval import evaluate
    from llmq.export import export_gguf
    from llmq.pipeline import quantize_model

    reference, source = load_model(args.model)
    seqlen = args.seqlen or min(2048, getattr(source.config, "max_position_embeddings", 2048))
    tokens = eval_tokens(source.tokenizer(), args.eval)
    if args.max_windows:
        tokens = tokens[: args.max_windows * seqlen]
    fp = evaluate(reference, tokens, seqlen, progress=False)
    print(f"FP32 ppl {fp.ppl:.4f}; {tokens.numel() // seqlen} windows of {seqlen}\n")
    print("| type | made by | file MiB | KL | top-1 | ppl |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_gguf(args.model, tmp / "f32.gguf", "F32")
        for t in args.types.split(","):
            files = {}
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[t]
            files["llama.cpp (llama-quantize)"] = tmp / f"llamacpp-{t}.gguf"
            if llama_cpp.llama_model_quantize(str(tmp / "f32.gguf").encode(), str(files["llama.cpp (llama-quantize)"]).encode(),
                                              ctypes.byref(params)) != 0:
                raise SystemExit(f"llama.cpp could not quantize to {t}")
            files["llmq RTN"] = tmp / f"rtn-{t}.gguf"
            export_gguf(args.model, files["llmq RTN"], t)
            files["llmq GPTQ"] = tmp / f"gptq-{t}.gguf"
            calib = {"dataset": args.calib} if args.calib else {}
            cfg = build_config({}, {"method": "gptq", "format": "gguf", "gguf_type": t, "seqlen": seqlen,
                                    "nsamples": args.nsamples, **calib})
            quantize_model(source, cfg, files["llmq GPTQ"], progress=False)
            for who, f in files.items():
                model, _, _ = load_for_eval(str(f))
                r = evaluate(model, tokens, seqlen, reference=reference, progress=False)
                print(f"| {t} | {who} | {f.stat().st_size / 2**20:.2f} | {r.kld:.5f} | {100 * r.top1:.2f}% | {r.ppl:.4f} |", flush=True)
                del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
