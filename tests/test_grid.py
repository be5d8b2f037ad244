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


def naive_full_range(x: torch.Tensor, bits: int, factor: float = 1.0, mirror: bool = False) -> torch.Tensor:
    """AutoRound's symmetric grid (int_sym), for one group in float64: the extreme of larger magnitude (ties:
    the negative one; ``mirror``: the other one's side instead), shrunk by ``factor``, on the code −2**(bits−1)
    of codes −2**(bits−1) … 2**(bits−1) − 1, the scale signed and rounded to fp16."""
    half = 2 ** (bits - 1)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    if lo == hi == 0:
        lo, hi = -1.0, 1.0
    if mirror:
        lo, hi = -hi, -lo
    end = (lo if -lo >= hi else hi) * factor
    scale = float(torch.tensor(-end / half, dtype=torch.float32).half().float())
    return scale * torch.clamp(torch.round(x.double() / scale), -half, half - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 16, 48])
def test_full_range_rtn_is_autorounds_symmetric_grid(bits, gs):
    g = torch.Generator().manual_seed(bits * 11 + gs)
    w = torch.randn(12, 96, generator=g)
    w[2, 7] = 9.0  # a positive extreme: GPTQ's symmetric grid clips it a step short
    w[3] = 0  # an all-zero row must stay finite and exact
    got = rtn_quantize(w, IntGrid(bits, gs, True, full_range=True)).dequantize(torch.float64)
    size = 96 if gs == -1 else gs
    ref = torch.cat([torch.stack([naive_full_range(w[r, c : c + size], bits) for r in range(12)]) for c in range(0, 96, size)], 1)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)
    assert torch.all(got[3] == 0)
    # each group's extreme of larger magnitude is on the grid (up to the fp16 rounding of its scale)
    groups = w.reshape(12, -1, size)
    at = groups.abs().argmax(-1, keepdim=True)
    assert torch.allclose(got.reshape(12, -1, size).gather(-1, at).float(), groups.gather(-1, at), rtol=1e-3, atol=0)


def test_full_range_keeps_negative_scales_and_equality():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    w[:, 0] = torch.where(torch.arange(16) % 2 == 0, 8.0, -8.0)  # rows alternate which side is larger
    plain, full = IntGrid(3, 32, True), IntGrid(3, 32, True, full_range=True)
    assert plain == full and hash(plain) == hash(full)  # what is stored is the same grid
    qt = rtn_quantize(w, full)
    assert torch.all((qt.scales[0::2, 0] < 0) & (qt.scales[1::2, 0] > 0))
    assert torch.equal(qt.scales, qt.scales.half().float())
    assert torch.all(qt.zeros == 4)
    stored = full.stored(torch.tensor([-0.3, 0.3, 0.0, -1e-12, -1e9]))
    tiny, top = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
    assert stored.tolist() == [-torch.tensor(0.3).half().item(), torch.tensor(0.3).half().item(), tiny, -tiny, -top]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_range_search_finds_the_exhaustive_optimum_either_way_round(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(60, 32, generator=g) * torch.rand(60, 1, generator=g)
    # groups of negative weights crowded near their extreme, but one positive just past it: that one on the end
    # level leaves the crowd 2**(bits-1) − 1 steps, clipping it; mirrored, the one alone is clipped
    w[::2] = -(torch.rand(30, 32, generator=g) * 0.6 + 0.4) * w[::2].abs().amax(1, keepdim=True)
    w[::2, 7] = -1.05 * w[::2].amin(1)
    imp = torch.rand(32, generator=g) * 4
    grid = IntGrid(bits, 32, True, search=True, full_range=True)
    scale, zero = grid.fit_groups(w, imp)
    got = ((w - scale[:, None] * (torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, grid.maxq) - zero[:, None])) ** 2
           * imp).sum(1).double()

    def error(x, f, mirror):
        return float(((x.double() - naive_full_range(x, bits, f, mirror)) ** 2 * imp.double()).sum())

    factors = [1 - k / 200 for k in range(31)]
    minmax = torch.tensor([error(x, 1.0, False) for x in w])
    one_way = torch.tensor([min(error(x, f, False) for f in factors) for x in w])
    both = torch.tensor([min(error(x, f, m) for f in factors for m in (False, True)) for x in w])
    assert torch.all(got <= minmax * (1 + 1e-6))  # never worse than the larger extreme's grid, group by group
    assert got.sum() <= both.sum() * 1.02
    if bits < 4:  # (at 4 bits the crowd's steps are fine enough that mirroring rarely pays)
        assert both.sum() < 0.95 * one_way.sum()  # (the data make mirroring matter)
        assert got.sum() < one_way.sum() * 0.97


def test_full_range_reaches_the_written_checkpoint(tmp_path):
    """--full-range travels from the command line to the file: the GPTQ checkpoint's weights, read back, are
    AutoRound's symmetric grid of the FP32 weights, negative scales included."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import ROOT, STORIES, need
    from llmq.checkpoint import load_model

    need(STORIES)
    out = tmp_path / "full-range"
    p = subprocess.run([sys.executable, "-m", "llmq", "quantize", "--quiet", "--method", "rtn", "--bits", "3", "--group-size",
                        "32", "--no-grid-search", "--full-range", "--model", str(STORIES), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    scales = torch.cat([t.float().flatten() for n, t in load_file(out / "model.safetensors").items() if n.endswith(".scales")])
    assert (scales < 0).any() and (scales > 0).any()
    got = dict(load_model(str(out))[0].named_parameters())
    fp = dict(load_model(str(STORIES))[0].named_parameters())
    names = [n for n in fp if ".layers." in n and n.endswith("proj.weight") and fp[n].shape[1] % 32 == 0]
    assert names
    for n in names:
        w = fp[n].detach()
        ref = torch.stack([naive_full_range(w[r, c : c + 32], 3) for r in range(w.shape[0]) for c in range(0, w.shape[1], 32)])
        assert torch.allclose(got[n].detach().double(), ref.reshape(w.shape), atol=1e-6, rtol=1e-3), n
