#!/usr/bin/env python
"""Time GPTQ, AWQ and learned rounding on one Llama-2-7B-shaped decoder layer, and GPTQ on a whole random
7B-shaped model streamed from disk; print wall time and peak device memory of each, as a markdown table.

    python scripts/gpu_check.py --device cuda                 # hidden 4096, inter 11008, 128 x 2048 tokens
    python scripts/gpu_check.py --device cpu --dry-run        # the same steps on a tiny model (CI)

Each run is a fresh process (its peak memory is its own; the dry run stays in one) on the same random
calibration ids, through ``llmq.pipeline.quantize_model`` as the CLI calls it.  Targets (issue: GPU path): one 7B layer GPTQ <= 4 s,
a whole 7B <= 5 min, peak GPU memory <= one layer + activations + 2 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def measure(method: str, src: Path, out: Path, ids_path: Path, device: str, extra: dict) -> dict:
    """One quantization run through the pipeline: wall time and peak memory (of this process)."""
    import torch

    from llmq.cli import peak_rss_mib
    from llmq.pipeline import quantize_model
    from llmq.recipe import build_config
    from llmq.source import ModelSource

    ids = torch.load(ids_path)
    cfg = build_config({}, {"method": method, "bits": 4, "group_size": 128, "nsamples": ids.shape[0],
                            "seqlen": ids.shape[1], "dtype": "float16", **extra})
    t0 = time.perf_counter()
    quantize_model(ModelSource(str(src)), cfg, out, device=device, progress=False, calib_ids=ids)
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"seconds": seconds, "peak_gpu_mib": gpu, "peak_rss_mib": peak_rss_mib()}


def run(method: str, src: Path, out: Path, ids: Path, device: str, extra: dict, fresh: bool) -> dict:
    """``measure`` in a fresh process (``fresh``: so its peak memory is its own) or in this one."""
    if not fresh:
        return measure(method, src, out, ids, device, extra)
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps([method, str(src), str(out), str(ids), device, extra])],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{method} on {src.name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="a tiny model, few tokens (checks the script, not the speed)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the whole-model run (7B: 32)")
    ap.add_argument("--iters", type=int, default=200, help="learned rounding steps")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, src, out, ids, device, extra = json.loads(args.child)
        print(json.dumps(measure(method, Path(src), Path(out), Path(ids), device, extra)))
        return
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_memory import make_model

    hidden, inter, vocab, n, seq, layers = (4096, 11008, 32000, 128, 2048, args.layers) if not args.dry_run \
        else (64, 172, 256, 4, 32, 2)
    iters = args.iters if not args.dry_run else 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = tmp / "ids.pt"
        torch.save(torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0)), ids)
        one = tmp / "one-layer"
        layer_bytes = make_model(one, 1, hidden, vocab, inter=inter, dtype="float16")
        for method, extra in [("gptq", {}), ("gptq", {"fp_targets": 1.0}), ("awq", {}), ("signround", {"iters": iters})]:
            label = method + ("+fp_targets" if extra.get("fp_targets") else "")
            rows.append((f"1 layer, {label}", run(method, one, tmp / f"q-{label}", ids, args.device, extra, not args.dry_run)))
        whole = tmp / "whole"
        make_model(whole, layers, hidden, vocab, inter=inter, dtype="float16")
        rows.append((f"{layers} layers, gptq", run("gptq", whole, tmp / "q-whole", ids, args.device, {}, not args.dry_run)))
    print(f"\ndevice {args.device}  hidden {hidden}  inter {inter}  calibration {n} x {seq}  "
          f"(1-layer checkpoint {layer_bytes / 2**30:.2f} GiB incl. embeddings)")
    print("| run | seconds | peak GPU MiB | peak RSS MiB |\n|---|---|---|---|")
    for label, r in rows:
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"| {label} | {r['seconds']:.1f} | {gpu} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
