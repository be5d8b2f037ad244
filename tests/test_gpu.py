"""The GPU path.  `gpu` tests run each method through the pipeline on device cuda and compare with the CPU
run (skipped without CUDA; scripts/gpu_check.sh runs them on a GPU machine).  The dry run of
scripts/gpu_check.sh, a tiny model on the CPU, runs everywhere so the script cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, save_tiny
from llmq.checkpoint import load_model
from llmq.pipeline import quantize_model
from llmq.recipe import build_config
from llmq.source import ModelSource
from llmq.tune import TuneOptions, tune_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gpu_check_dry_run():
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = re.findall(r"^\| (\d+ layers?, [\w+]+) \| ([\d.]+) \| - \| (\d+) \|$", p.stdout, re.M)
    assert [r[0] for r in rows] == ["1 layer, gptq", "1 layer, gptq+fp_targets", "1 layer, awq", "1 layer, signround",
                                    "2 layers, gptq"]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method,extra", [("rtn", {}), ("gptq", {}), ("gptq", {"fp_targets": 1.0}), ("awq", {}),
                                          ("awq+gptq", {}), ("signround", {"iters": 10})])
def test_cuda_run_matches_the_cpu_run(tmp_path, method, extra):
    """Same checkpoint layout; codes equal but for the few that GPU arithmetic rounds the other way."""
    src = save_tiny("llama", tmp_path / "src")
    ids = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": method, "bits": 4, "group_size": 32, "seqlen": 64, "nsamples": 16,
                            "dtype": "float32", **extra})
    for device in ("cpu", "cuda"):
        quantize_model(ModelSource(str(src)), cfg, tmp_path / device, device=device, progress=False, calib_ids=ids)
    assert load_file(tmp_path / "cpu" / "model.safetensors").keys() == load_file(tmp_path / "cuda" / "model.safetensors").keys()
    a, b = (dict(load_model(str(tmp_path / d))[0].named_parameters()) for d in ("cpu", "cuda"))
    for k in a:
        if k.endswith("proj.weight"):  # dequantized codes: at most a few rounded the other way
            assert (a[k] != b[k]).float().mean() < 0.02, k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0.02, atol=1e-3)


@pytest.mark.gpu
@cuda
def test_cuda_tuning_matches_the_cpu_tuning(tmp_path):
    """End-to-end tuning (codes moving, bf16 products on both devices) on cuda and on the CPU: the same scales
    but for the rounding of the products, and nearly the same codes."""
    src = save_tiny("llama", tmp_path / "src")
    ids = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 32, "dtype": "float32"})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=False)
    options = TuneOptions(steps=8, batch=4, compute_dtype="bfloat16")
    for device in ("cpu", "cuda"):
        tune_checkpoint(str(tmp_path / "q"), tmp_path / device, ids=ids, options=options, device=device, progress=False)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("qweight"):  # (packed codes: at most a few moved differently)
            assert (a[k] != b[k]).float().mean() < 0.02, k
        elif a[k].is_floating_point():
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0.02, atol=1e-3)
