#!/usr/bin/env python
"""How much of a perplexity difference between two quantizations is noise?

Two sources of noise are measured on the same evaluation windows:
  * calibration: GPTQ is run with several calibration draws (seeds) from one or more datasets;
    the spread of its perplexity over draws is what a different calibration sample would give;
  * evaluation text: a paired bootstrap over windows (each resample scores the same windows
    for both models) gives a 95% interval for the perplexity ratio GPTQ / RTN of each run.
Mean KL divergence against the unquantized model is reported next to it for every run.

    python scripts/ppl_noise.py --model ../shared/assets/models/llmq-ref-6m \
        --eval-dataset ../shared/assets/datasets/wikitext-2-raw-v1/test-00000-of-00001.parquet \
        --calib-datasets c4.jsonl wiki-valid.parquet --seqlen 256 --bits 4 --group-size 128 --seeds 8 \
        --out eval/results/ppl-noise-llmq-ref-6m-w4
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def paired_ratio_ci(a: torch.Tensor, b: torch.Tensor, tokens_per_window: int, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Perplexity ratio exp(mean NLL a - mean NLL b) and its 95% paired-bootstrap interval over windows."""
    d = (a - b).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (resamples, d.numel()), generator=g)
    boot = d[idx].mean(1) / tokens_per_window
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return math.exp(d.mean().item() / tokens_per_window), math.exp(lo), math.exp(hi)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval-dataset", required=True)
    ap.add_argument("--calib-datasets", nargs="+", required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=8, help="calibration draws per dataset (seeds 0..N-1)")
    ap.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ without act-order")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--out", required=True, help="path prefix: writes OUT.md and OUT.json")
    args = ap.parse_args()

    from llmq.checkpoint import load_model
    from llmq.recipe import build_config
    from llmq.data import eval_tokens
    from llmq.eval import evaluate
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource

    reference, source = load_model(args.model)
    tokens = eval_tokens(source.tokenizer(), args.eval_dataset)
    per_tok = args.seqlen - 1
    base = {"bits": args.bits, "group_size": args.group_size, "sym": True, "seqlen": args.seqlen, "nsamples": args.nsamples,
            "dtype": "float32"}
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, opts: dict) -> dict:
            out = Path(tmp) / name
            quantize_model(ModelSource(args.model), build_config({}, {**base, **opts}), out, progress=False)
            model, _ = load_model(str(out))
            r = evaluate(model, tokens, args.seqlen, reference=reference, progress=False, batch_size=8, per_window=True)
            row = {"name": name, **opts, "ppl": r.ppl, "kld": r.kld, "top1": r.top1,
                   "nll": torch.tensor(r.window_nll), "ref_nll": torch.tensor(r.reference_window_nll), "windows": r.windows}
            print(f"{name:28s} ppl {r.ppl:9.4f}  KL {r.kld:.5f}  top1 {100 * r.top1:6.2f}%", flush=True)
            return row

        rtn = run(f"rtn-w{args.bits}", {"method": "rtn"})
        for ds in args.calib_datasets:
            for seed in range(args.seeds):
                runs.append(run(f"gptq-{Path(ds).stem[:12]}-s{seed}",
                                {"method": "gptq", "act_order": args.act_order, "dataset": ds, "seed": seed}))

    fp_nll = rtn["ref_nll"]
    fp_ppl = math.exp(fp_nll.sum().item() / (per_tok * rtn["windows"]))
    rows = []
    for r in [rtn, *runs]:
        ratio_rtn = paired_ratio_ci(r["nll"], rtn["nll"], per_tok, args.resamples)
        ratio_fp = paired_ratio_ci(r["nll"], fp_nll, per_tok, args.resamples)
        rows.append({k: v for k, v in r.items() if k not in ("nll", "ref_nll")} | {"ratio_vs_rtn": ratio_rtn, "ratio_vs_fp32": ratio_fp})

    g = [r for r in rows if r["method"] == "gptq"]
    summary = {}
    for ds in [None, *args.calib_datasets]:
        sel = [r for r in g if ds is None or r["dataset"] == ds]
        ppl = [r["ppl"] for r in sel]
        summary[ds or "all"] = {"n": len(sel), "ppl_mean": statistics.fmean(ppl), "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                                "ppl_min": min(ppl), "ppl_max": max(ppl), "kld_mean": statistics.fmean(r["kld"] for r in sel),
                                "kld_max": max(r["kld"] for r in sel), "at_or_below_rtn": sum(p <= rtn["ppl"] for p in ppl)}

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "args": vars(args), "fp32_ppl": fp_ppl, "rows": rows,
                                                    "summary": summary}, indent=2) + "\n")
    act = " with act-order" if args.act_order else ""
    lines = [f"# {Path(args.model).name}: how noisy is perplexity at W{args.bits} g{args.group_size}?", "", f"Command: `{command}`", "",
             f"Eval: `{args.eval_dataset}`, seqlen {args.seqlen}, {rtn['windows']} windows; FP32 perplexity {fp_ppl:.4f}. "
             f"GPTQ{act}, {args.nsamples} × {args.seqlen} calibration tokens per draw, seeds 0..{args.seeds - 1} per dataset. "
             f"Ratios: perplexity of the row's model over RTN's (or FP32's) on the same windows, with a 95% paired bootstrap "
             f"interval over windows ({args.resamples} resamples).", "",
             "| run | perplexity | mean KL (nats) | top-1 agree | ppl / RTN [95%] | ppl / FP32 [95%] |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["ratio_vs_rtn"], r["ratio_vs_fp32"]
        lines.append(f"| {r['name']} | {r['ppl']:.4f} | {r['kld']:.5f} | {100 * r['top1']:.2f}% | {a[0]:.4f} [{a[1]:.4f}, {a[2]:.4f}] | "
                     f"{b[0]:.4f} [{b[1]:.4f}, {b[2]:.4f}] |")
    lines += ["", "| GPTQ calibration | draws | ppl mean ± std | ppl min – max | draws with ppl ≤ RTN's | mean KL | max KL |",
              "|---|---|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k} | {s['n']} | {s['ppl_mean']:.3f} ± {s['ppl_std']:.3f} | {s['ppl_min']:.3f} – {s['ppl_max']:.3f} | "
                     f"{s['at_or_below_rtn']} | {s['kld_mean']:.5f} | {s['kld_max']:.5f} |")
    lines.append(f"\nRTN: perplexity {rtn['ppl']:.4f}, mean KL {rtn['kld']:.5f}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
