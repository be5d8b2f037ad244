#!/usr/bin/env python
"""Wall time and peak RSS of quantization methods on the same model and calibration.

Each run happens in a fresh process.  RTN is the baseline of the ratios.  When
`llmcompressor` or `gptqmodel` are installed, the same GPTQ recipe is also run through
them (not part of CI; those packages are optional).

    python scripts/bench_quantize.py --model ../shared/assets/models/llmq-ref-6m --seqlen 256
    python scripts/bench_quantize.py --random-hidden 1024 --random-layers 4     # a bigger random Llama
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
tool, method, src, out, nsamples, seqlen, bits, gs = sys.argv[1:9]
nsamples, seqlen, bits, gs = int(nsamples), int(seqlen), int(bits), int(gs)
g = torch.Generator().manual_seed(0)
from transformers import AutoConfig
vocab = AutoConfig.from_pretrained(src).vocab_size
ids = torch.randint(0, vocab, (nsamples, seqlen), generator=g)
t0 = time.perf_counter()
if tool == "llmq":
    from llmq.config import build_config
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource
    cfg = build_config({}, {"method": method, "bits": bits, "group_size": gs, "nsamples": nsamples, "seqlen": seqlen})
    quantize_model(ModelSource(src), cfg, out, progress=False, calib_ids=ids)
elif tool == "llmcompressor":
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=src, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme=f"W{bits}A16", ignore=["lm_head"]),
            max_seq_length=seqlen, num_calibration_samples=nsamples, output_dir=out)
elif tool == "gptqmodel":
    from gptqmodel import GPTQModel, QuantizeConfig
    model = GPTQModel.load(src, QuantizeConfig(bits=bits, group_size=gs))
    model.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * seqlen} for r in ids])
    model.save(out)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(tool: str, method: str, src: str, out: Path, args) -> dict | None:
    p = subprocess.run([sys.executable, "-c", CHILD, tool, method, src, str(out), str(args.nsamples), str(args.seqlen),
                        str(args.bits), str(args.group_size)], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"{tool} {method}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model directory (default: a random Llama built here)")
    ap.add_argument("--random-hidden", type=int, default=1024)
    ap.add_argument("--random-layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_memory import make_model

            src = str(Path(tmp) / "random-llama")
            make_model(Path(src), args.random_layers, args.random_hidden, 32000)
        runs = [("llmq", "rtn"), ("llmq", "gptq")]
        runs += [(t, "gptq") for t in ("llmcompressor", "gptqmodel") if importlib.util.find_spec(t) is not None]
        results = {}
        for tool, method in runs:
            r = run(tool, method, src, Path(tmp) / f"{tool}-{method}", args)
            if r is not None:
                results[(tool, method)] = r
        base = results.get(("llmq", "rtn"))
        print(f"\nmodel {src}  W{args.bits} g{args.group_size}  calibration {args.nsamples} x {args.seqlen} tokens")
        print(f"{'tool':15s} {'method':6s} {'seconds':>9s} {'x rtn':>7s} {'peak RSS MiB':>13s} {'x rtn':>7s}")
        for (tool, method), r in results.items():
            rt = r["seconds"] / base["seconds"] if base else float("nan")
            rm = r["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan")
            print(f"{tool:15s} {method:6s} {r['seconds']:9.2f} {rt:7.2f} {r['peak_rss_mib']:13.0f} {rm:7.2f}")
        missing = [t for t in ("llmcompressor", "gptqmodel") if importlib.util.find_spec(t) is None]
        if missing:
            print(f"(not installed, skipped: {', '.join(missing)})")


if __name__ == "__main__":
    main()
