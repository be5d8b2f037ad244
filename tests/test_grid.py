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


def naive_searched(w: torch.Tensor, imp: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive search, one group (row of ``w``) at a time: every range factor 1.000, 0.995, ..., 0.850,
    the textbook grid of that shrunk range (fp16 scale), least Σ imp (w - ŵ)²; per group its error at
    the best factor and at factor 1 (min/max)."""
    maxq = 2**bits - 1
    best, minmax = [], []
    for x in w.double():
        errs = []
        for k in range(31):
            f = 1 - k / 200
            lo, hi = min(x.min().item(), 0.0) * f, max(x.max().item(), 0.0) * f
            if sym:
                hi = max(abs(lo), hi)
                lo = -hi
            scale = float(torch.tensor((hi - lo) / maxq, dtype=torch.float32).half().float())
            zero = (maxq + 1) / 2 if sym else min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            errs.append(float(((x - scale * (q - zero)) ** 2 * imp.double()).sum()))
        best.append(min(errs))
        minmax.append(errs[0])
    return torch.tensor(best), torch.tensor(minmax)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_grid_search_finds_the_exhaustive_optimum(bits, sym):
    g = torch.Generator().manual_seed(bits + 10 * sym)
    w = torch.randn(40, 32, generator=g) * torch.rand(40, 1, generator=g)
    w[:, 5] *= 6  # outliers: the min/max grid wastes its codes on them
    imp = torch.rand(32, generator=g) * 4
    grid = IntGrid(bits, 32, sym, search=True)
    scale, zero = grid.fit_groups(w, imp)
    got = ((w - scale[:, None] * (torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, grid.maxq) - zero[:, None])) ** 2
           * imp).sum(1).double()
    best, minmax = naive_searched(w, imp, bits, sym)
    assert torch.all(got <= minmax * (1 + 1e-6))  # never worse than min/max, group by group
    assert got.sum() <= best.sum() * 1.02  # its coarser steps land (nearly) where the exhaustive search does
    assert got.sum() < minmax.sum() * 0.97


def test_grid_search_follows_importance():
    """The columns that weigh more are fitted better: the weighted search lowers their error."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 64, generator=g)
    imp = torch.ones(64)
    imp[:8] = 50.0
    grid = IntGrid(3, 64, True, search=True)

    def heavy_error(importance: torch.Tensor | None) -> float:
        p = grid.fit(w, importance)
        s, z, _ = p.per_column(64, grid)
        d = w - s * (torch.clamp(torch.round(w / s) + z, 0, grid.maxq) - z)
        return float((d[:, :8] ** 2).sum())

    assert heavy_error(imp) < 0.95 * heavy_error(None)


def test_grid_search_off_is_min_max_and_does_not_change_equality():
    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    a, b = IntGrid(4, 32, False), IntGrid(4, 32, False, search=True)
    assert a == b and hash(a) == hash(b)  # what is stored is the same grid
    ref = naive_rtn(w, 4, 32, False)
    assert torch.allclose(rtn_quantize(w, a).dequantize(torch.float64), ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(rtn_quantize(w, b).dequantize(torch.float64), ref, atol=1e-6, rtol=1e-5)


def test_grid_search_reaches_the_written_checkpoint(tmp_path):
    """--grid-search travels from the command line to the file: every group of the written RTN W3 checkpoint
    has at most the min/max grid's error against the FP32 weights, and the total is lower."""
    import subprocess
    import sys

    from conftest import ROOT, STORIES, need
    from llmq.checkpoint import load_model

    need(STORIES)
    models = {}
    for flag in ("--no-grid-search", "--grid-search"):
        out = tmp_path / flag.strip("-")
        p = subprocess.run([sys.executable, "-m", "llmq", "quantize", "--quiet", "--method", "rtn", "--bits", "3",
                            "--group-size", "32", "--model", str(STORIES), "--out", str(out), flag],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stderr
        models[flag] = dict(load_model(str(out))[0].named_parameters())
    fp = dict(load_model(str(STORIES))[0].named_parameters())
    names = [n for n in fp if ".layers." in n and n.endswith("proj.weight") and fp[n].shape[1] % 32 == 0]
    assert names
    total = {flag: 0.0 for flag in models}
    for n in names:
        err = {flag: ((m[n] - fp[n]) ** 2).reshape(fp[n].shape[0], -1, 32).sum(-1) for flag, m in models.items()}
        assert torch.all(err["--grid-search"] <= err["--no-grid-search"] * (1 + 1e-5) + 1e-12), n
        total = {flag: total[flag] + float(e.sum()) for flag, e in err.items()}
    assert total["--grid-search"] < 0.97 * total["--no-grid-search"]
