#!/usr/bin/env python
"""Peak RSS of `llmq quantize` vs model depth: streaming keeps it flat.

Builds randomly initialised Llama-shaped checkpoints (hidden 1024, intermediate 4096,
so the decoder weights dominate) at two depths, quantizes each in a fresh process and
prints peak RSS.  For contrast it also measures a whole-model load (transformers
from_pretrained + RTN in memory), which grows with depth.

    python scripts/bench_memory.py [--depths 8 16] [--method gptq] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
mode, src, out, method = sys.argv[1:5]
if mode == "stream":
    from llmq.recipe import build_config
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource
    cfg = build_config({}, {"method": method, "bits": 4, "group_size": 128, "nsamples": 8, "seqlen": 512})
    ids = torch.randint(0, 1000, (8, 512), generator=torch.Generator().manual_seed(0))
    quantize_model(ModelSource(src), cfg, out, progress=False, calib_ids=ids)
else:
    from transformers import AutoModelForCausalLM
    from llmq.grid import IntGrid
    from llmq.methods.rtn import rtn_quantize
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    spec = IntGrid(4, 128, True)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
            m.weight.data = rtn_quantize(m.weight.data, spec).dequantize()
print(json.dumps({"peak_rss_mib": [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]}))
"""


def make_model(path: Path, layers: int, hidden: int, vocab: int, tokenizer: bool = False, inter: int | None = None,
               dtype: str = "float32") -> int:
    """Write a random Llama checkpoint (fp32 unless ``dtype``; MLP width ``inter``, default 4 x hidden) one
    layer at a time (never all in memory). Returns bytes.

    ``tokenizer``: also save a word-level tokenizer of ``vocab`` made-up tokens (tools that
    insist on one get it; the benchmarks feed token ids directly).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    inter = inter or 4 * hidden
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"], dtype=dtype)  # (declared, as real checkpoints declare it)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, path / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    dt = getattr(torch, dtype)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(dt)  # noqa: E731
    shard("embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dt),
                                "lm_head.weight": rnd(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"layer{i}.safetensors", {
            p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(hidden, hidden),
            p + "self_attn.v_proj.weight": rnd(hidden, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dt),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dt)})
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def peak(mode: str, src: Path, out: Path, method: str) -> float:
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), method], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{mode} run failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs=2, default=[8, 16])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the whole-model load comparison")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            src = Path(tmp) / f"llama-{depth}"
            size = make_model(src, depth, args.hidden, args.vocab)
            stream = peak("stream", src, Path(tmp) / f"q-{depth}", args.method)
            whole = None if args.no_baseline else peak("whole", src, Path(tmp) / "unused", args.method)
            rows.append((depth, size / 2**20, stream, whole))
            print(f"depth {depth:3d}: checkpoint {size / 2**20:8.0f} MiB | llmq {args.method} streaming peak RSS {stream:8.0f} MiB"
                  + ("" if whole is None else f" | whole-model load peak RSS {whole:8.0f} MiB"), flush=True)
    (d0, s0, a0, w0), (d1, s1, a1, w1) = rows
    print(f"\ncheckpoint size ratio  depth {d1}/{d0}: {s1 / s0:.2f}")
    print(f"llmq streaming ratio   depth {d1}/{d0}: {a1 / a0:.3f}  (target <= 1.15)")
    if w0 is not None:
        print(f"whole-model load ratio depth {d1}/{d0}: {w1 / w0:.3f}")


if __name__ == "__main__":
    main()
