"""llama.cpp against llmq's GGUF files: three tables for eval/results/gguf-llama-cpp.md.

  types        every GGUF type of --model's RTN file in llama.cpp (llama-cpp-python) against the same file
               dequantized by the `gguf` package and run in torch: largest logit difference, top-1 agreement
  real configs every published configuration in tests/gguf_configs/ (random weights): llama.cpp's logits
               against transformers' on an F32 file, mean KL and top-1 agreement
  protocol     llama.cpp's own perplexity tool (llama-perplexity: chunks of --ctx tokens, BOS first, the
               second half scored, its own tokenization of the raw text) on llmq's F32 files, against
               transformers computing the same protocol on the HF tokenizer's tokens

    python scripts/gguf_llama_cpp_check.py --model ../shared/assets/models/llmq-ref-6m \
        --protocol-models ../shared/assets/models/llmq-ref-6m ../shared/assets/models/stories260K \
        --protocol-text ../shared/assets/datasets/wikitext-2-raw-v1/wiki.test.raw --llama-perplexity PATH
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def types_table(model: str, types: list[str], prompts: int, length: int) -> None:
    import llama_cpp
    from transformers import AutoModelForCausalLM

    from llmq.export import export_gguf

    vocab = AutoModelForCausalLM.from_pretrained(model).config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids_list = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(prompts)]
    print("| type | file MiB | max abs Δlogit / max abs logit | top-1 agreement |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            d = Path(tmp) / t
            d.mkdir()
            export_gguf(model, d / "m.gguf", t)
            llm = llama_cpp.Llama(model_path=str(d / "m.gguf"), n_ctx=max(256, length), logits_all=True, verbose=False)
            ref = AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32).eval()
            errs, agree = [], []
            for ids in ids_list:
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


def real_configs_table() -> None:
    """The test's own builders (tests/test_gguf_real_configs.py), so the table and the test measure the same thing."""
    from transformers import AutoModelForCausalLM

    from llmq.export import export_gguf

    spec = importlib.util.spec_from_file_location("real_configs", ROOT / "tests" / "test_gguf_real_configs.py")
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    print("| family | mirrors | hidden / heads / KV heads / head size | tokens | mean KL(HF ‖ llama.cpp) | top-1 agreement |\n"
          "|---|---|---|---|---|---|")
    import json

    for path in t.CONFIGS:
        config = t.real_config(path)
        window = getattr(config, "sliding_window", None)
        seq = 640 if config.model_type.startswith("gemma3") and window and window < 600 else 128
        with tempfile.TemporaryDirectory() as tmp:
            ids = t.save_confident_model(config, Path(tmp) / "src", seq)
            export_gguf(str(Path(tmp) / "src"), Path(tmp) / "m.gguf", "F32")
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "src", dtype=torch.float32).eval()
            with torch.no_grad():
                want = hf(ids[None]).logits[0]
            kl, top1 = t.agreement(want, t.llama_cpp_logits(Path(tmp) / "m.gguf", ids))
        c = config
        heads = getattr(c, "num_attention_heads", None) or c.n_head
        hidden = getattr(c, "hidden_size", None) or c.n_embd
        shape = f"{hidden} / {heads} / {getattr(c, 'num_key_value_heads', None) or heads} / {getattr(c, 'head_dim', None) or hidden // heads}"
        mirrors = json.loads(path.read_text())["mirrors"]
        print(f"| {path.stem} | {mirrors} | {shape} | {seq} | {kl:.2e} | {100 * top1:.2f}% |", flush=True)


def hf_protocol_ppl(model: str, text: str, ctx: int) -> tuple[float, int]:
    """llama-perplexity's protocol in transformers: the text tokenized once (BOS first when the tokenizer adds
    one), chunks of ``ctx`` tokens each starting with BOS, the second half of each chunk scored."""
    from llmq.checkpoint import load_model

    hf, source = load_model(model)
    tok = source.tokenizer()
    ids = tok(text)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id] else None
    nll, n = 0.0, 0
    for start in range(0, len(ids) // ctx * ctx, ctx):
        chunk = torch.tensor(ids[start : start + ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logp = F.log_softmax(hf(chunk[None]).logits[0].float(), -1)
        first = ctx // 2
        nll -= logp[first : ctx - 1].gather(1, chunk[first + 1 :, None]).sum().item()
        n += ctx - 1 - first
    return math.exp(nll / n), len(ids) // ctx


def llama_perplexity(binary: str, gguf_file: Path, text_file: str, ctx: int) -> tuple[float, int]:
    p = subprocess.run([binary, "-m", str(gguf_file), "-f", text_file, "-c", str(ctx), "-b", str(ctx), "-t", "2"],
                       capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stdout + p.stderr)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", p.stdout + p.stderr)
    if not m:
        raise SystemExit(f"llama-perplexity failed: {(p.stderr or p.stdout)[-500:]}")
    return float(m.group(1)), int(chunks.group(1)) if chunks else -1


def protocol_table(models: list[str], text_file: str, binary: str, ctx: int, max_chars: int) -> None:
    from llmq.export import export_gguf

    text = Path(text_file).read_text()[:max_chars]
    print("| model | file | llama-perplexity (llama.cpp's tokens) | chunks | transformers, same protocol (HF tokens) | chunks |"
          "\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "text.raw").write_text(text)
        for model in models:
            f = Path(tmp) / f"{Path(model).name}.gguf"
            export_gguf(model, f, "F32")
            cpp, cpp_chunks = llama_perplexity(binary, f, str(Path(tmp) / "text.raw"), ctx)
            hf, hf_chunks = hf_protocol_ppl(model, text, ctx)
            print(f"| {Path(model).name} | llmq F32 | {cpp:.4f} | {cpp_chunks} | {hf:.4f} | {hf_chunks} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="types table: the model whose RTN files are checked")
    ap.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_K_M,Q5_K_M,F16,BF16,F32")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--real-configs", action="store_true")
    ap.add_argument("--protocol-models", nargs="*", default=[])
    ap.add_argument("--protocol-text")
    ap.add_argument("--protocol-ctx", type=int, default=256)
    ap.add_argument("--protocol-chars", type=int, default=300_000)
    ap.add_argument("--llama-perplexity", default="llama-perplexity")
    args = ap.parse_args()
    if args.model:
        types_table(args.model, args.types.split(","), args.prompts, args.length)
    if args.real_configs:
        real_configs_table()
    if args.protocol_models:
        protocol_table(args.protocol_models, args.protocol_text, args.llama_perplexity, args.protocol_ctx, args.protocol_chars)


if __name__ == "__main__":
    main()
