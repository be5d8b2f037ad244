#!/usr/bin/env python
"""Wall time, peak RSS and (optionally) accuracy of GPTQ runs on the same model and calibration.

Each run happens in a fresh process on the same calibration token ids; llmq's RTN is the
baseline of the time and memory ratios.  When `llmcompressor` or `gptqmodel` are installed,
the same recipe (W4, group 128, symmetric, damp 0.01, static act-order) is also run through
them (not part of CI; those packages are optional).  With --eval-dataset every output is
read back by `llmq eval` and compared with the source model (mean KL, top-1, perplexity),
so all tools' files are measured by the same code.

    python scripts/bench_quantize.py --model ../shared/assets/models/llmq-ref-6m --seqlen 256 \
        --calib-dataset c4 --eval-dataset wikitext2
    python scripts/bench_quantize.py --random-hidden 1024 --random-layers 4     # a bigger random Llama
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
tool, method, src, out, ids_path, bits, gs = sys.argv[1:8]
bits, gs = int(bits), int(gs)
ids = torch.load(ids_path)
nsamples, seqlen = ids.shape
act_order = method == "gptq-act"
# Tensors left unquantized keep the source's dtype, as the other tools keep them: only the method differs.
from transformers import AutoConfig
dtype = str(getattr(AutoConfig.from_pretrained(src), "dtype", None) or "float32").removeprefix("torch.")
t0 = time.perf_counter()
if tool == "llmq":
    from llmq.recipe import build_config
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource
    cfg = build_config({}, {"method": method.split("-")[0], "bits": bits, "group_size": gs, "nsamples": nsamples,
                            "seqlen": seqlen, "dtype": dtype, **({"act_order": act_order} if method.startswith("gptq") else {})})
    quantize_model(ModelSource(src), cfg, out, progress=False, calib_ids=ids)
elif tool == "llmcompressor":
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group" if gs > 0 else "channel",
                               group_size=gs if gs > 0 else None)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=0.01, actorder="static" if act_order else None)
    oneshot(model=src, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=nsamples,
            output_dir=out)
elif tool == "gptqmodel":
    from gptqmodel import GPTQModel, QuantizeConfig
    # act_group_aware (its default reordering) off: plain GPTQ, or act-order with static groups, as above
    model = GPTQModel.load(src, QuantizeConfig(bits=bits, group_size=gs, sym=True, desc_act=act_order,
                                               static_groups=act_order, act_group_aware=False, damp_percent=0.01))
    model.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * seqlen} for r in ids])
    model.save(out)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mib": [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]}))
"""

OTHER_TOOLS = ("llmcompressor", "gptqmodel")


def run(tool: str, method: str, src: str, out: Path, ids_path: Path, args) -> dict | None:
    env = dict(os.environ)
    if tool == "gptqmodel":  # its default thread pools ask for more CPU workers than a 2-core machine gives
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    p = subprocess.run([sys.executable, "-c", CHILD, tool, method, src, str(out), str(ids_path), str(args.bits),
                        str(args.group_size)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(f"{tool} {method}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def evaluate(out: Path, src: str, args) -> dict | None:
    """The output read back by llmq's loader and compared with the source model."""
    js = out.with_suffix(".eval.json")
    cmd = [sys.executable, "-m", "llmq", "eval", "--model", str(out), "--reference", src, "--dataset", args.eval_dataset,
           "--seqlen", str(args.seqlen), "--json", str(js), "--quiet"]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"eval of {out.name}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(js.read_text())


def calibration_ids(src: str, args) -> "torch.Tensor":  # noqa: F821
    import torch

    if args.calib_dataset is None:  # random ids: timing only
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(src).vocab_size
        return torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    from llmq.data import calibration_tokens
    from llmq.source import ModelSource

    return calibration_tokens(ModelSource(src).tokenizer(), args.calib_dataset, args.nsamples, args.seqlen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model directory (default: a random Llama built here)")
    ap.add_argument("--random-hidden", type=int, default=1024)
    ap.add_argument("--random-layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-dataset", help="calibration text (llmq dataset spec); default: random token ids")
    ap.add_argument("--eval-dataset", help="also evaluate every output against the source model on this text")
    ap.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_memory import make_model

            src = str(Path(tmp) / "random-llama")
            make_model(Path(src), args.random_layers, args.random_hidden, 32000, tokenizer=True)
        ids_path = Path(tmp) / "ids.pt"
        torch.save(calibration_ids(src, args), ids_path)
        runs = [("llmq", "rtn"), ("llmq", "gptq"), ("llmq", "gptq-act")]
        runs += [(t, m) for t in OTHER_TOOLS if importlib.util.find_spec(t) is not None for m in ("gptq", "gptq-act")]
        results = {}
        for tool, method in runs:
            out = Path(tmp) / f"{tool}-{method}"
            r = run(tool, method, src, out, ids_path, args)
            if r is not None and args.eval_dataset:
                r["eval"] = evaluate(out, src, args)
            if r is not None:
                results[(tool, method)] = r
        base = results.get(("llmq", "rtn"))
        print(f"\nmodel {src}  W{args.bits} g{args.group_size}  calibration {args.nsamples} x {args.seqlen} tokens "
              f"({args.calib_dataset or 'random ids'})")
        head = f"{'tool':15s} {'method':9s} {'seconds':>9s} {'x rtn':>7s} {'peak RSS MiB':>13s} {'x rtn':>7s}"
        if args.eval_dataset:
            head += f" {'mean KL':>9s} {'top-1':>7s} {'perplexity':>11s}"
        print(head)
        for (tool, method), r in results.items():
            rt = r["seconds"] / base["seconds"] if base else float("nan")
            rm = r["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan")
            line = f"{tool:15s} {method:9s} {r['seconds']:9.2f} {rt:7.2f} {r['peak_rss_mib']:13.0f} {rm:7.2f}"
            if args.eval_dataset:
                e = r.get("eval")
                line += (f" {e['kld']:9.5f} {100 * e['top1']:6.2f}% {e['ppl']:11.4f}" if e
                         else "   (eval failed)")
            print(line)
        missing = [t for t in OTHER_TOOLS if importlib.util.find_spec(t) is None]
        if missing:
            print(f"(not installed, skipped: {', '.join(missing)})")


if __name__ == "__main__":
    main()
