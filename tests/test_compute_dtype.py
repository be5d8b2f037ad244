"""The dtype calibration runs in: chosen by hardware and source, and bf16 Hessians kept exact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from llmq import dtypes
from llmq.dtypes import bf16_products, compute_dtype
from llmq.errors import LlmqError
from llmq.methods.gptq import Hessian
from llmq.pipeline import quantize_model
from llmq.plan import resolve
from llmq.recipe import build_config
from llmq.source import ModelSource

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("units", [True, False])
@pytest.mark.parametrize("name,source,device,cpu_with_units,cpu_without", [
    ("auto", BF16, "cpu", BF16, FP32),  # a bf16 model runs as it is only where the CPU multiplies bf16 fast
    ("auto", FP16, "cpu", FP32, FP32),  # fp16 products are slow on CPUs
    ("auto", FP32, "cpu", FP32, FP32),  # a fp32 model's activations are not rounded to bf16 unasked
    ("auto", FP16, "cuda", FP16, FP16),  # on a GPU the model's own dtype
    ("float32", BF16, "cuda", FP32, FP32),
    ("bfloat16", FP32, "cpu", BF16, BF16),
])
def test_compute_dtype_choice(monkeypatch, units, name, source, device, cpu_with_units, cpu_without):
    monkeypatch.setattr(dtypes, "cpu_multiplies_bf16", lambda: units)
    assert compute_dtype(name, source, device) == (cpu_with_units if units else cpu_without)


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(LlmqError, match="--compute-dtype"):
        build_config({}, {"method": "rtn", "compute_dtype": "int8"})


def test_bf16_products_restore_the_setting():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(ValueError):
        with bf16_products():
            raise ValueError
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_hessian_of_bf16_activations_is_exact():
    """bf16 inputs upcast exactly, so their products on bf16 units must match float64 ones to float32's
    precision, not to bf16's (a product rounded to bf16 would be off by ~1e-3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 700, generator=g).to(BF16)
    x0 = (x.float() + 0.1 * torch.randn(x.shape, generator=g)).to(BF16)
    h = Hessian(700)
    h.add(x, x0)
    xs, x0s = x.reshape(-1, 700).double(), x0.reshape(-1, 700).double()
    assert torch.allclose(h.H.double(), 2 / 1024 * xs.T @ xs, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h._cross, x0s.T @ xs, rtol=1e-5, atol=1e-3)


def _bf16_llama(path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden=128, inter=256)).to(BF16)
    model.config.dtype = BF16
    model.save_pretrained(path)
    return ModelSource(str(path))


def test_bf16_calibration_fits_like_fp32(tmp_path):
    """GPTQ on a bf16 model calibrated in bf16 (what ``auto`` picks on a CPU with bf16 units, and on any
    GPU) reaches the layer-wise losses of a float32 calibration: only the activations' rounding differs."""
    source = _bf16_llama(tmp_path / "src")
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(1))
    errors = {}
    for name in ("float32", "bfloat16"):
        cfg = build_config({}, {"method": "gptq", "bits": 3, "group_size": 32, "nsamples": 8, "seqlen": 64,
                                "compute_dtype": name})
        assert resolve(cfg, source).compute_dtype == dtypes.torch_dtype(name)
        stats = quantize_model(source, cfg, tmp_path / name, progress=False, calib_ids=ids)
        errors[name] = {(r["layer"], r["module"]): r["error"] for r in stats.records if "error" in r}
    assert errors["bfloat16"].keys() == errors["float32"].keys() and len(errors["float32"]) == 14
    for name, e in errors["float32"].items():
        assert errors["bfloat16"][name] == pytest.approx(e, rel=0.1), name
