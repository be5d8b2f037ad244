"""Scale refit after GPTQ: each row's group scales against a naive per-row least-squares solve, the loss
it reports against the loss computed directly, and what it must leave alone."""

from __future__ import annotations

import pytest
import torch

from llmq.grid import IntGrid
from llmq.methods.gptq import Hessian, gptq_quantize
from llmq.methods.rtn import rtn_quantize
from llmq.refit import refit_scales


def _problem(n: int = 96, out: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g)
    x += 0.1 * torch.randn(1024, n, generator=g) * torch.linspace(0.1, 3, n)
    h = Hessian(n)
    h.add(x)
    return torch.randn(out, n, generator=g), h.H


def _loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    d = (W - Q).double()
    return ((d @ H.double()) * d).sum(1)


def _naive_best(W: torch.Tensor, qt, H: torch.Tensor) -> torch.Tensor:
    """Per row, the loss at the least-squares group factors: C (n x G) holds the row's dequantized values
    of group g in column g; minimise |H^½ (w - C γ)|² with lstsq, one row at a time, in float64."""
    D = qt.dequantize().double()
    L = torch.linalg.cholesky(H.double() + 1e-9 * torch.eye(H.shape[0], dtype=torch.float64))
    G = qt.scales.shape[1]
    losses = []
    for r in range(D.shape[0]):
        C = torch.zeros(D.shape[1], G, dtype=torch.float64)
        C[torch.arange(D.shape[1]), qt.g_idx.long()] = D[r]
        gamma = torch.linalg.lstsq(L.T @ C, L.T @ W[r].double()).solution
        d = W[r].double() - C @ gamma
        losses.append(d @ H.double() @ d)
    return torch.stack(losses)


@pytest.mark.parametrize("bits,gs,sym", [(3, 32, True), (2, 32, False), (4, 40, True)])
def test_refit_reaches_the_least_squares_scales(bits, gs, sym):
    """(Groups of 40 in 96 columns: a short last group, which the refit finds by g_idx; groups of 32 it sums
    over by views.)"""
    W, H = _problem()
    qt, _ = gptq_quantize(W, H, IntGrid(bits, gs, sym), act_order=True)
    assert bool(qt.group_width) == (gs == 32)
    new, change = refit_scales(qt, W, H)
    before, after, best = _loss(W, qt.dequantize(), H), _loss(W, new.dequantize(), H), _naive_best(W, qt, H)
    assert torch.all(after <= before * (1 + 1e-6))
    assert float((before - after).sum()) > 0.05 * float((before - best).sum())  # it does move
    # Within the fp16 rounding of the stored scales of the exact optimum.
    assert torch.allclose(after, best, rtol=2e-3, atol=1e-6 * float(before.max()))
    assert torch.allclose(change.double(), after - before, rtol=1e-2, atol=1e-5 * float(before.max()))
    assert torch.equal(new.codes, qt.codes) and torch.equal(new.zeros, qt.zeros)
    assert torch.equal(new.scales, new.scales.half().float())


def test_refit_keeps_rows_and_groups_it_cannot_improve():
    """A row already at its best keeps its scales bit for bit; a group whose codes all sit at the zero point
    (its values are 0 at any scale) keeps its scale."""
    W, H = _problem()
    grid = IntGrid(4, 32, True)
    qt, _ = gptq_quantize(W, H, grid, act_order=True)
    qt.codes[0, :32] = 8  # row 0, group 0: all at the zero point
    once, _ = refit_scales(qt, W, H)
    assert once.scales[0, 0] == qt.scales[0, 0]
    twice, change = refit_scales(once, W, H)
    settled = change == 0
    assert settled.float().mean() > 0.5 and torch.equal(twice.scales[settled], once.scales[settled])


def test_refit_of_inputs_all_alike_lowers_rows_and_keeps_the_rest():
    """Every token the same (H of rank 1): some rows' G x G systems are singular in float32 despite the ridge
    (torch.linalg.solve raised on them); those rows keep their scales, and no row's loss rises."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(768, 256, generator=g) * 0.02
    x = torch.randn(1, 256, generator=g).expand(64, 256)
    H = x.T @ x
    qt = rtn_quantize(W, IntGrid(4, 128, True))
    new, change = refit_scales(qt, W, H)
    before, after = _loss(W, qt.dequantize(), H), _loss(W, new.dequantize(), H)
    assert torch.all(after <= before * (1 + 1e-5) + 1e-12)
    assert (after < before * 0.99).any() and torch.equal(new.codes, qt.codes)


def test_gptq_reports_the_refitted_loss():
    W, H = _problem(seed=3)
    qt, info = gptq_quantize(W, H, IntGrid(3, 32, True), act_order=True, refit=True)
    plain, plain_info = gptq_quantize(W, H, IntGrid(3, 32, True), act_order=True)
    direct = _loss(W, qt.dequantize(), H)
    assert torch.allclose(info.row_error.double(), direct, rtol=2e-3, atol=1e-6 * float(direct.max()))
    assert float(direct.sum()) < float(_loss(W, plain.dequantize(), H).sum())
    assert torch.equal(qt.codes, plain.codes)
