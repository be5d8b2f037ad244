"""llama.cpp (through llama-cpp-python) against gguf's dequantizer + torch, for each GGUF type llmq writes.

For every type: export the model's GGUF file, run the same prompts through llama.cpp and through
transformers' GGUF loader (which dequantizes with the `gguf` package), and print the largest logit
difference (relative to the largest logit) and the top-1 agreement.  Needs `pip install -e .[llamacpp]`.

    python scripts/gguf_llama_cpp_check.py --model ../shared/assets/models/llmq-ref-6m
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_K_M,Q5_K_M,F16,BF16,F32")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    args = ap.parse_args()

    import llama_cpp
    from transformers import AutoModelForCausalLM

    from llmq.export import export_gguf

    vocab = AutoModelForCausalLM.from_pretrained(args.model).config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.length,), generator=g).tolist() for _ in range(args.prompts)]
    print("| type | file MiB | max abs Δlogit / max abs logit | top-1 agreement |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types.split(","):
            d = Path(tmp) / t
            d.mkdir()
            export_gguf(args.model, d / "m.gguf", t)
            llm = llama_cpp.Llama(model_path=str(d / "m.gguf"), n_ctx=max(256, args.length), logits_all=True, verbose=False)
            ref = AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32).eval()
            errs, agree = [], []
            for ids in prompts:
                llm.reset()
                llm.eval(ids)
                got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
                with torch.no_grad():
                    want = ref(torch.tensor([ids])).logits[0]
                errs.append((got - want).abs().max().item() / want.abs().max().item())
                agree.append((got.argmax(-1) == want.argmax(-1)).float().mean().item())
            size = (d / "m.gguf").stat().st_size / 2**20
            print(f"| {t} | {size:.2f} | {max(errs):.4f} | {100 * float(np.mean(agree)):.2f}% |", flush=True)
            del llm


if __name__ == "__main__":
    main()
