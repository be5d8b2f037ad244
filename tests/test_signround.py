"""Learned rounding (signround) on top of GPTQ: where it starts, that its codes stay on the grid a format
stores, and that it lowers the error of a layer as a plain forward of the written checkpoint measures it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny
from llmq.checkpoint import load_model
from llmq.gguf.types import BLOCK_TYPES
from llmq.grid import IntGrid
from llmq.methods.gptq import gptq_quantize
from llmq.methods.rtn import rtn_quantize
from llmq.methods.signround import Rounding
from llmq.pipeline import quantize_model
from llmq.recipe import build_config
from llmq.source import ModelSource


def _problem(out=16, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, n, generator=g) * torch.linspace(0.2, 3, n)
    W = torch.randn(out, n, generator=g)
    return W, 2 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("grid", [IntGrid(3, 128, True), IntGrid(4, 64, False), BLOCK_TYPES["Q4_K"], BLOCK_TYPES["Q3_K"]],
                         ids=lambda g: g.name)
def test_start_is_gptqs_codes_and_moves_stay_on_the_grid(grid):
    """v = 0 gives GPTQ's codes exactly; any v in [-1/2, 1/2] gives codes within one step of them, in the
    grid's range, with GPTQ's scales, which the format packs and unpacks unchanged."""
    W, H = _problem()
    qt, info = gptq_quantize(W, H, grid, act_order=True, keep_updated=True)
    r = Rounding.start(qt, info.updated, torch.device("cpu"))
    assert torch.equal(r.result().codes, qt.codes)
    r.v.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    moved = r.result()
    step = (moved.codes.int() - qt.codes.int()).abs()
    assert step.max() <= 1 and (step > 0).float().mean() > 0.05
    assert int(moved.codes.max()) <= grid.maxq
    assert torch.equal(moved.scales, qt.scales) and torch.equal(moved.zeros, qt.zeros)
    if hasattr(grid, "pack"):
        back = grid.unpack(grid.pack(moved), moved.shape)
        torch.testing.assert_close(back.dequantize(), moved.dequantize(), rtol=0, atol=0)


def _layer0_error(model_dir, reference, ids) -> float:
    """Mean squared difference of decoder layer 0's output, checkpoint vs the unquantized model (plain forwards)."""
    outs = []
    for m in (load_model(str(model_dir))[0], reference):
        got = []
        hook = m.model.layers[0].register_forward_hook(lambda _m, _a, o: got.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(input_ids=ids)
        hook.remove()
        outs.append(got[0])
    return float((outs[0] - outs[1]).pow(2).mean())


def test_learned_rounding_lowers_the_layer_error_of_the_written_checkpoint(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"bits": 3, "group_size": 32, "seqlen": 32, "nsamples": 16, "dtype": "float32"}
    quantize_model(ModelSource(str(src)), build_config({}, {**recipe, "method": "gptq"}), tmp_path / "gptq",
                   progress=False, calib_ids=ids)
    quantize_model(ModelSource(str(src)), build_config({}, {**recipe, "method": "signround", "iters": 40, "batch": 4}),
                   tmp_path / "sr", progress=False, calib_ids=ids)
    a, b = load_file(tmp_path / "gptq" / "model.safetensors"), load_file(tmp_path / "sr" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".qweight") and ".layers.0." in k)
    reference = load_model(str(src))[0]
    assert _layer0_error(tmp_path / "sr", reference, ids) < 0.98 * _layer0_error(tmp_path / "gptq", reference, ids)


def test_nf4_keeps_gptqs_codes(tmp_path):
    """NF4's values are not evenly spaced: learned rounding leaves them to GPTQ (same file as GPTQ with the
    same fp_targets)."""
    src = save_tiny("llama", tmp_path / "src")
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"bits": 4, "seqlen": 32, "nsamples": 8, "dtype": "float32", "format": "bitsandbytes"}
    for m, extra in [("gptq", {"fp_targets": 1.0}), ("signround", {"iters": 5})]:
        quantize_model(ModelSource(str(src)), build_config({}, {**recipe, "method": m, **extra}), tmp_path / m,
                       progress=False, calib_ids=ids)
    a, b = (load_file(tmp_path / m / "model.safetensors") for m in ("gptq", "signround"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_progress_shows_the_learning_steps(tmp_path, capsys):
    src = save_tiny("llama", tmp_path / "src")
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": "signround", "iters": 12, "bits": 4, "group_size": 32, "seqlen": 32, "nsamples": 8,
                            "dtype": "float32"})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=True, calib_ids=ids)
    err = capsys.readouterr().err
    assert "layer 1/2 learned rounding step 10/12" in err and "layer 2/2 learned rounding step 0/12" in err


def test_rtn_start_and_learned_scales_stay_on_the_grid():
    """From RTN, v = t = 0 gives RTN's codes and scales; moved, the scales are what the format stores (fp16)
    and the file holds exactly the weights learning saw.  Block grids learn no scales (theirs are quantized)."""
    W, _ = _problem()
    grid = IntGrid(3, 64, False)
    qt = rtn_quantize(W, grid)
    r = Rounding.start(qt, W, torch.device("cpu"), scales=True)
    assert torch.equal(r.result().codes, qt.codes) and torch.equal(r.result().scales, qt.scales)
    g = torch.Generator().manual_seed(2)
    r.t.uniform_(-0.2, 0.2, generator=g), r.v.uniform_(-0.5, 0.5, generator=g)
    moved = r.result()
    assert not torch.equal(moved.scales, qt.scales)
    assert torch.equal(moved.scales.half().float(), moved.scales)
    assert torch.equal(moved.zeros, qt.zeros) and int(moved.codes.max()) <= grid.maxq
    torch.testing.assert_close(moved.dequantize(), r.weight(), rtol=0, atol=0)
    assert Rounding.start(rtn_quantize(W, BLOCK_TYPES["Q4_K"]), W, torch.device("cpu"), scales=True).t is None


@pytest.mark.parametrize("order", ["natural", "permuted"])
def test_scale_gradient_is_the_straight_through_derivative(order):
    """The hand-derived d loss / d t equals autograd's through a straight-through rounding (clamped codes
    included), for groups of consecutive columns and for act-order's permuted ones."""
    W, _ = _problem()
    grid = IntGrid(3, 64, False)
    qt = rtn_quantize(W, grid)
    if order == "permuted":  # (the gradient needs no codes: only which group each column's scale is)
        qt = dataclasses.replace(qt, g_idx=qt.g_idx[torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(5))])
    r = Rounding.start(qt, W, torch.device("cpu"), scales=True)
    assert (r.group > 0) == (order == "natural")
    r.t.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(3))  # (shrunk scales clamp some codes)
    G = torch.randn(W.shape, generator=torch.Generator().manual_seed(4))
    cols = r.qt.g_idx.long()
    t = r.t.clone().requires_grad_()
    s = (r.scale0 * t.exp()).half().float()  # (as stored; the rounding passes gradients straight through too)
    s = r.scale0 * t.exp() + (s - r.scale0 * t.exp()).detach()
    s = s[:, cols]
    u = W / s
    q = torch.clamp(u + (torch.round(u) - u).detach() + r.zero, 0, grid.maxq)
    (G * s * (q - r.zero)).sum().backward()
    assert (torch.round(W / s.detach()) + r.zero > grid.maxq).any()
    torch.testing.assert_close(r.scale_gradient(G), t.grad, rtol=2e-3, atol=1e-3)  # (s vs fp16(s) in ds/dt)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_learning_from_rtn_lowers_the_layer_error_of_the_written_checkpoint(tmp_path, momentum):
    src = save_tiny("llama", tmp_path / "src")
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"bits": 3, "group_size": 32, "seqlen": 32, "nsamples": 16, "dtype": "float32"}
    quantize_model(ModelSource(str(src)), build_config({}, {**recipe, "method": "rtn"}), tmp_path / "rtn",
                   progress=False, calib_ids=ids)
    quantize_model(ModelSource(str(src)), build_config({}, {**recipe, "method": "signround", "iters": 40, "batch": 4,
                                                            "start": "rtn", "momentum": momentum}),
                   tmp_path / "sr", progress=False, calib_ids=ids)
    a, b = load_file(tmp_path / "rtn" / "model.safetensors"), load_file(tmp_path / "sr" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".scales") and ".layers.0." in k)  # (scales learned)
    reference = load_model(str(src))[0]
    assert _layer0_error(tmp_path / "sr", reference, ids) < 0.8 * _layer0_error(tmp_path / "rtn", reference, ids)


def test_momentum_steps_on_the_sign_of_the_running_average():
    """A gradient that reverses for one step: plain signed steps go back, signum (momentum 0.9) keeps going
    while the running average 0.09·g1 + 0.1·g2 still has g1's sign."""
    W, _ = _problem(out=4, n=64)
    qt = rtn_quantize(W, IntGrid(4, 64, True))
    g1 = torch.ones_like(W)
    moved = {}
    for m in (0.0, 0.9):
        r = Rounding.start(qt, W, torch.device("cpu"))
        r.step_by_sign(g1, 0.01, m)
        r.step_by_sign(-0.5 * g1, 0.01, m)
        moved[m] = r.v
    assert torch.allclose(moved[0.0], torch.zeros_like(W))  # (step and back)
    assert torch.allclose(moved[0.9], torch.full_like(W, -0.02))  # (both steps against g1)
