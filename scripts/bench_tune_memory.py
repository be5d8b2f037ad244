#!/usr/bin/env python
"""Peak RSS of `llmq tune` on a large vocabulary: a batch through in parts against the whole batch at once.

Builds a random two-layer Llama with a large vocabulary (the logits, not the weights, then dominate), packs
it at W4 g128 by RTN, and tunes it for a few steps in a fresh process twice: as llmq does (each pass's
logits within tune.PASS_LOGITS_BYTES) and with that limit lifted (the whole batch in one pass).  Prints
each run's peak RSS and seconds, and their ratios.

With ``--weights`` a wide model instead (a 7B layer's width, a small vocabulary: the weights dominate), tuned
as llmq does, codes moving, and again with --recompute (activation checkpointing): prints each run's peak RSS
against the float32 model's size, and the ratios.

    python scripts/bench_tune_memory.py [--vocab 128000] [--seqlen 512] [--batch 4] [--steps 4]
    python scripts/bench_tune_memory.py --weights [--hidden 4096 --inter 11008 --vocab 4096 --batch 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_memory import make_model  # (scripts/ is on the path when this script runs)

CHILD = r"""
import json, sys, time, torch
import llmq.tune as tune
src, out, whole, seqlen, batch, steps, vocab, recompute = sys.argv[1:9]
if whole == "1":
    tune.PASS_LOGITS_BYTES = 2**62
ids = torch.randint(0, int(vocab), (2 * int(batch), int(seqlen)), generator=torch.Generator().manual_seed(0))
options = tune.TuneOptions(steps=int(steps), batch=int(batch), recompute=recompute == "1")
t0 = time.perf_counter()
tune.tune_checkpoint(src, out, ids=ids, options=options, progress=False)  # (reference: the provenance's source)
rss = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss_mib": rss, "seconds": time.perf_counter() - t0}))
"""


def run(src: Path, out: Path, whole: bool, args: argparse.Namespace, recompute: bool = False) -> dict:
    argv = [str(src), str(out), "1" if whole else "0", str(args.seqlen), str(args.batch), str(args.steps), str(args.vocab),
            "1" if recompute else "0"]
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"tuning failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--weights", action="store_true", help="a wide model, tuned once: peak RSS per weight")
    ap.add_argument("--inter", type=int, default=None, help="MLP width (default 4 x hidden)")
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    from llmq.pipeline import quantize_model
    from llmq.recipe import build_config
    from llmq.source import ModelSource

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "llama"
        size = make_model(src, args.layers, args.hidden, args.vocab, inter=args.inter)
        packed = Path(tmp) / "llama-w4"
        cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 128, "dtype": "float32"})
        quantize_model(ModelSource(str(src)), cfg, packed, progress=False)
        logits_mib = args.batch * args.seqlen * args.vocab * 4 / 2**20
        rows = {}
        print(f"vocab {args.vocab}, {args.batch} windows of {args.seqlen}: {logits_mib:.0f} MiB of float32 logits a batch")
        if args.weights:
            print(f"float32 model {size / 2**20:.0f} MiB")
            for recompute in (False, True):
                rows[recompute] = r = run(packed, Path(tmp) / f"tuned-{recompute}", False, args, recompute)
                label = "recompute (--recompute)" if recompute else "llmq tune              "
                print(f"{label}: peak RSS {r['peak_rss_mib']:8.0f} MiB ({r['peak_rss_mib'] * 2**20 / size:.2f}x the float32 "
                      f"model), {r['seconds']:6.1f} s", flush=True)
            print(f"\npeak RSS ratio recompute / not: {rows[True]['peak_rss_mib'] / rows[False]['peak_rss_mib']:.2f}")
            print(f"time ratio     recompute / not: {rows[True]['seconds'] / rows[False]['seconds']:.2f}")
            return
        for whole in (False, True):
            rows[whole] = r = run(packed, Path(tmp) / f"tuned-{whole}", whole, args)
            label = "whole batch per pass" if whole else "llmq (parts)        "
            print(f"{label}: peak RSS {r['peak_rss_mib']:8.0f} MiB, {r['seconds']:6.1f} s", flush=True)
    print(f"\npeak RSS ratio parts / whole: {rows[False]['peak_rss_mib'] / rows[True]['peak_rss_mib']:.2f}")
    print(f"time ratio     parts / whole: {rows[False]['seconds'] / rows[True]['seconds']:.2f}")


if __name__ == "__main__":
    main()
