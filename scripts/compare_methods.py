#!/usr/bin/env python
"""Quantize one model several ways and evaluate each against the unquantized model.

Each variant goes through the real path: quantize -> checkpoint on disk -> load -> eval.
Writes a markdown table and a JSON record (with the command line) to --out.

    python scripts/compare_methods.py --model DIR --eval-dataset FILE --calib-dataset FILE \
        --seqlen 256 --group-size 128 --variants rtn-w4 gptq-w4 gptq-w4-act --out eval/results/NAME

Variant names: METHOD-wBITS[-gSIZE|-pc][-asym][-gs|-nogs][-act|-noact][-static][-refit][-noclip][-itN][-lrE4][-fptPERCENT][-stK][-cfp32|-cbf16] or METHOD-GGUFTYPE[-act|-noact]
(a GGUF file of that type or mix), e.g. gptq-w3-act, rtn-w8-pc, awq+gptq-w4-noclip, gptq-q4_0, gptq-q4_k_m-noact.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_variant(name: str, default_gs: int) -> dict:
    from llmq.gguf.types import GGUF_TYPES

    parts = name.split("-")
    opts = {"method": parts[0], "group_size": default_gs, "sym": True}
    for p in parts[1:]:
        if p.startswith("w") and p[1:].isdigit():
            opts["bits"] = int(p[1:])
        elif p.startswith("g") and p[1:].isdigit():
            opts["group_size"] = int(p[1:])
        elif p == "pc":
            opts["group_size"] = -1
        elif p == "asym":
            opts["sym"] = False
        elif p == "act":
            opts["act_order"] = True
        elif p == "static":
            opts["static_groups"] = True
        elif p == "gs":
            opts["grid_search"] = True  # integer grids: each group's range searched, not min/max
        elif p == "nogs":
            opts["grid_search"] = False
        elif p == "refit":
            opts["refit_scales"] = True  # GPTQ: each row's group scales refitted to its codes
        elif p == "noclip":
            opts["awq_clip"] = False
        elif p == "noact":
            opts["act_order"] = False
        elif p.startswith("it") and p[2:].isdigit():
            opts["iters"] = int(p[2:])  # learned rounding steps
        elif p.startswith("lr") and p[2:].isdigit():
            opts["lr"] = int(p[2:]) / 10000  # learned rounding's first step, in units of 1e-4
        elif p.startswith("st") and p[2:].isdigit():
            opts["search_tokens"] = int(p[2:]) * 1024  # AWQ: tokens of the block scale search, in thousands
        elif p.startswith("fpt") and p[3:].isdigit():
            opts["fp_targets"] = int(p[3:]) / 100  # weight of the unquantized model's outputs, in percent
        elif p in ("cfp32", "cbf16"):
            opts["compute_dtype"] = {"cfp32": "float32", "cbf16": "bfloat16"}[p]  # calibration's dtype
        elif p.upper() in GGUF_TYPES:
            opts.update(format="gguf", gguf_type=p.upper())  # a GGUF file on that block grid (or mix)
        else:
            raise SystemExit(f"cannot read variant {name!r} (part {p!r})")
    return opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval-dataset", required=True)
    ap.add_argument("--calib-dataset", required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-windows", type=int, help="evaluate only the first N windows of the eval text (quick checks)")
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="path prefix: writes OUT.md and OUT.json")
    args = ap.parse_args()

    from llmq.checkpoint import load_for_eval, load_model
    from llmq.recipe import build_config
    from llmq.data import eval_tokens
    from llmq.eval import evaluate
    from llmq.gguf.types import BLOCK_TYPES, MIXES
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource

    reference, source = load_model(args.model)
    tokens = eval_tokens(source.tokenizer(), args.eval_dataset)
    if args.max_windows:
        tokens = tokens[..., : args.max_windows * args.seqlen + 1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            opts = parse_variant(v, args.group_size)
            cfg = build_config({}, {**opts, "dataset": args.calib_dataset, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                    "seed": args.seed, "dtype": "float32"})
            t0 = time.perf_counter()
            if cfg.format == "gguf":
                stats = None
                quantize_model(ModelSource(args.model), cfg, Path(tmp) / f"{v}.gguf", progress=False)
                seconds = time.perf_counter() - t0
                model, _, _ = load_for_eval(str(Path(tmp) / f"{v}.gguf"))
            else:
                stats = quantize_model(ModelSource(args.model), cfg, Path(tmp) / v, progress=False)
                seconds = time.perf_counter() - t0
                model, _ = load_model(str(Path(tmp) / v))
            r = evaluate(model, tokens, args.seqlen, reference=reference, progress=False, batch_size=8)
            errs = [x["error"] for x in stats.records if "error" in x] if stats else []
            opts.setdefault("bits", BLOCK_TYPES[MIXES.get(cfg.gguf_type.upper(), cfg.gguf_type.upper())].bits if cfg.format == "gguf" else cfg.bits)
            rows.append({"variant": v, **opts, "ppl": r.ppl, "kld": r.kld, "top1": r.top1, "fp_ppl": r.reference_ppl,
                         "mean_rel_error": sum(errs) / len(errs) if errs else None, "quantize_seconds": seconds,
                         "windows": r.windows, "tokens_scored": r.tokens_scored})
            print(f"{v:20s} ppl {r.ppl:9.4f}  KL {r.kld:.5f}  top1 {100 * r.top1:6.2f}%  ({seconds:.1f}s)", flush=True)
            del model
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "args": vars(args), "rows": rows}, indent=2) + "\n")
    fp = rows[0]["fp_ppl"]
    lines = [f"# {Path(args.model).name}: methods vs the FP32 model", "", f"Command: `{command}`", "",
             f"Eval: `{args.eval_dataset}`, seqlen {args.seqlen}, {rows[0]['windows']} windows, {rows[0]['tokens_scored']} tokens scored; "
             f"FP32 perplexity {fp:.4f}. Calibration: `{args.calib_dataset}`, {args.nsamples} × {args.seqlen} tokens, seed {args.seed}. "
             "Unquantized tensors kept in fp32 so only the method differs.", "",
             "| variant | bits | group | sym | act-order | perplexity | Δppl | mean KL (nats) | top-1 agree | mean rel. ‖WX−QX‖² | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "" if r["mean_rel_error"] is None else f"{r['mean_rel_error']:.4g}"
        lines.append(f"| {r['variant']} | {r['bits']} | {r['group_size']} | {r['sym']} | {r.get('act_order', 'default')} | {r['ppl']:.4f} | "
                     f"{r['ppl'] - fp:+.4f} | {r['kld']:.5f} | {100 * r['top1']:.2f}% | {err} | {r['quantize_seconds']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
