"""Quantizer math against a naive per-group loop."""

from __future__ import annotations

import pytest
import torch

from llmq.grid import IntGrid
from llmq.methods.rtn import rtn_quantize


def naive_rtn(w: torch.Tensor, bits: int, gs: int, sym: bool) -> torch.Tensor:
    """Textbook min/max round-to-nearest, one group at a time, in float64 (scales rounded to fp16)."""
    out, n = w.shape
    gs = n if gs == -1 else gs
    maxq = 2**bits - 1
    res = torch.empty_like(w, dtype=torch.float64)
    for r in range(out):
        for g0 in range(0, n, gs):
            x = w[r, g0 : g0 + gs].double()
            lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
            if sym:
                hi = max(abs(lo), hi)
                lo = -hi
            if lo == hi == 0:
                lo, hi = -1.0, 1.0
            scale = float(torch.tensor((hi - lo) / maxq, dtype=torch.float32).half().float())
            zero = (maxq + 1) / 2 if sym else min(max(round(-lo / float(torch.tensor(scale, dtype=torch.float32))), 0), maxq)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            res[r, g0 : g0 + gs] = scale * (q - zero)
    return res


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 16, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_naive(bits, gs, sym):
    w = torch.randn(12, 100, generator=torch.Generator().manual_seed(bits * 7 + gs))
    w[3] = 0  # an all-zero row must stay finite and exact
    got = rtn_quantize(w, IntGrid(bits, gs, sym)).dequantize(torch.float64)
    ref = naive_rtn(w, bits, gs, sym)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)
    assert torch.all(got[3] == 0)


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errs = [((rtn_quantize(w, IntGrid(b, 64, True)).dequantize() - w) ** 2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_codes_in_range_and_scales_fp16_exact():
    spec = IntGrid(3, 32, False)
    qt = rtn_quantize(torch.randn(8, 96) * 100, spec)
    assert int(qt.codes.max()) <= 7 and int(qt.zeros.max()) <= 7
    assert torch.equal(qt.scales, qt.scales.half().float())


def test_dequantize_of_a_large_matrix_is_the_formula_elementwise():
    """QuantizedTensor.dequantize works a few rows at a time; every value is still scale * (q - zero)."""
    w = torch.randn(1100, 8192, generator=torch.Generator().manual_seed(5))
    qt = rtn_quantize(w, IntGrid(4, 128, False))
    g = qt.g_idx.long()
    naive = qt.scales[:, g] * (qt.codes.float() - qt.zeros[:, g].float())
    assert torch.equal(qt.dequantize(), naive)
    assert torch.equal(qt.dequantize(torch.float16), naive.to(torch.float16))
