"""Wall time of GPTQ on 1 process against N processes (torchrun, gloo on CPU, or NCCL with --device cuda),
on a random mixture-of-experts model whose expert solves dominate the run.

    python scripts/bench_distributed.py [--nproc 2] [--experts 32] [--hidden 512] [--layers 2]

Prints the times and their ratios, and checks that the N-process checkpoint is identical to the one-process
one at the same threads per process (torchrun's default: one).  On a 2-core
machine expect the solves to scale and the forwards not to (each rank gets one core either way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _model(path: Path, a: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", vocab_size=512, hidden_size=a.hidden, num_hidden_layers=a.layers,
                               num_attention_heads=8, num_key_value_heads=2, intermediate_size=a.hidden,
                               max_position_embeddings=4096, num_local_experts=a.experts, num_experts_per_tok=2,
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def _ids(a: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, 512, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))


def _recipe(a: argparse.Namespace) -> dict:
    return {"method": "gptq", "bits": 4, "group_size": 128, "nsamples": a.nsamples, "seqlen": a.seqlen, "dtype": "float32"}


def worker(a: argparse.Namespace) -> None:
    """One process of a run (alone, or one rank under torchrun)."""
    from llmq.distributed import join, leave
    from llmq.pipeline import quantize_model
    from llmq.recipe import build_config
    from llmq.source import ModelSource

    ranks, device = join(a.device)
    try:
        quantize_model(ModelSource(a.model), build_config({}, _recipe(a)), a.out, progress=False, calib_ids=_ids(a),
                       device=device, ranks=ranks)
    finally:
        leave()


def _run(a: argparse.Namespace, model: Path, out: Path, nproc: int, threads: int = 1) -> float:
    args = [__file__, "--worker", "--model", str(model), "--out", str(out), "--device", a.device,
            *(f"--{k}={getattr(a, k)}" for k in ("nsamples", "seqlen"))]
    cmd = [sys.executable, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # (torchrun gives each rank one thread)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _model(tmp / "src", a)
        every = _run(a, tmp / "src", tmp / "every", 1, threads=os.cpu_count() or 1)
        one = _run(a, tmp / "src", tmp / "one", 1)
        many = _run(a, tmp / "src", tmp / "many", a.nproc)
        x, y = load_file(tmp / "one" / "model.safetensors"), load_file(tmp / "many" / "model.safetensors")
        same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    print(json.dumps({"model": f"mixtral-shaped, hidden {a.hidden}, {a.experts} experts, {a.layers} layers",
                      "calibration": f"{a.nsamples} x {a.seqlen}", "cpus": os.cpu_count(), "torch": torch.__version__}))
    print(f"1 process, 1 thread: {one:.1f} s   {a.nproc} processes, 1 thread each: {many:.1f} s   ratio {many / one:.2f}   "
          f"identical checkpoints: {same}")
    print(f"1 process, {os.cpu_count()} threads: {every:.1f} s   ratio of {a.nproc} processes to it: {many / every:.2f}   "
          "(BLAS sums in another order with more threads: its codes may differ in the last rounding)")


if __name__ == "__main__":
    main()
