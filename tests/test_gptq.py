"""GPTQ solver on single linears with known inputs."""

from __future__ import annotations

import pytest
import torch

from llmq.grid import IntGrid
from llmq.methods.gptq import (Hessian, _flip_in_place, _inverse_factor, add_gram, gptq_quantize, row_quadratic, symmetric,
                               symmetric_in_place)
from llmq.methods.rtn import rtn_quantize


def _inputs(kind: str, n: int = 128, m: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(m, n, generator=g)
    # correlated: a low-rank mixing plus a little noise, with uneven channel scales
    base = torch.randn(m, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g)
    return base + 0.1 * torch.randn(m, n, generator=g) * torch.linspace(0.1, 3, n)


def _hessian(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    h = Hessian(x.shape[1], dtype)
    for chunk in x.split(300):
        h.add(chunk)
    return h.H


def _out_err(w, q, x):
    return ((x @ (w - q).T) ** 2).sum().item()


def test_hessian_is_running_average():
    x = _inputs("random", 16, 1000)
    assert torch.allclose(_hessian(x, torch.float64), 2 * x.double().T @ x.double() / 1000, rtol=1e-10)


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("bits,gs", [(4, 32), (3, -1), (4, 128), (2, 64)])
def test_gptq_output_error_not_worse_than_rtn(kind, bits, gs):
    x = _inputs(kind)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    spec = IntGrid(bits, gs, True)
    qg, info = gptq_quantize(w, _hessian(x), spec)
    qr = rtn_quantize(w, spec)
    assert _out_err(w, qg.dequantize(), x) <= _out_err(w, qr.dequantize(), x)
    assert not info.fallback_rtn


@pytest.mark.parametrize("gs,sym", [(32, True), (-1, False), (128, True)])
def test_identity_hessian_equals_rtn(gs, sym):
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(2))
    spec = IntGrid(4, gs, sym)
    qg, _ = gptq_quantize(w, torch.eye(128), spec)
    qr = rtn_quantize(w, spec)
    assert torch.equal(qg.codes, qr.codes) and torch.equal(qg.scales, qr.scales) and torch.equal(qg.zeros, qr.zeros)


def test_solver_independent_of_hessian_scale():
    x = _inputs("correlated")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    H = _hessian(x, torch.float64)
    spec = IntGrid(4, 32, False)
    a, _ = gptq_quantize(w, H, spec)
    b, _ = gptq_quantize(w, H * 1024.0, spec)  # a power of two keeps the arithmetic exact
    c, _ = gptq_quantize(w, H * 1e-3, spec)
    assert torch.equal(a.codes, b.codes)
    assert (a.codes != c.codes).float().mean() < 1e-3  # non-power-of-two scale: at most rounding ties move


def naive_gptq(W: torch.Tensor, H: torch.Tensor, spec: IntGrid, damp: float = 0.01) -> torch.Tensor:
    """The original algorithm one column at a time, no blocks, no lazy batches (float64)."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    gs = n if spec.group_size == -1 else spec.group_size
    Q = torch.zeros_like(W)
    for j in range(n):
        if j % gs == 0:
            scale, zero = spec.fit_groups(W[:, j : j + gs])
            scale, zero = scale.double(), zero.double()
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, spec.maxq)
        Q[:, j] = q
        err = (W[:, j] - scale * (q - zero)) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
    return Q


@pytest.mark.parametrize("gs,n", [(32, 192), (-1, 160), (64, 300)])
def test_blocked_equals_naive(gs, n):
    x = _inputs("correlated", n, 4096, seed=5)
    w = torch.randn(48, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    H = _hessian(x, torch.float64)
    spec = IntGrid(4, gs, False)
    blocked, _ = gptq_quantize(w, H, spec, block_size=128)
    assert torch.equal(blocked.codes.long(), naive_gptq(w, H, spec).long())


def test_act_order_static_groups_monotone_and_consistent():
    x = _inputs("correlated", 128, 2048, seed=7)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8))
    spec = IntGrid(4, 32, True)
    q, _ = gptq_quantize(w, _hessian(x), spec, act_order=True)
    assert torch.all(q.g_idx[1:] >= q.g_idx[:-1])
    # static groups: every grid comes from the unquantized weights of its natural group
    s_ref, _ = spec.fit_groups(w[:, 32:64])
    assert torch.equal(q.scales[:, 1], s_ref)
    assert _out_err(w, q.dequantize(), x) <= _out_err(w, rtn_quantize(w, spec).dequantize(), x)


def test_rank_deficient_and_dead_inputs_do_not_crash():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g)  # rank 8 of 64
    x[:, 5] = 0  # a dead input channel
    w = torch.randn(32, 64, generator=g)
    q, info = gptq_quantize(w, _hessian(x), IntGrid(4, 32, True))
    assert torch.isfinite(q.dequantize()).all()
    assert q.dequantize()[:, 5].abs().max() <= q.scales.max()  # dead column quantized from zero


@pytest.mark.parametrize("n", [100, 600, 2100])
def test_gram_by_panels_is_the_whole_product(n):
    x = torch.randn(300, n, generator=torch.Generator().manual_seed(n))
    acc = torch.zeros(n, n, dtype=torch.float64)
    add_gram(acc, x)
    add_gram(acc, 2 * x)
    full = 5 * x.double().T @ x.double()
    assert torch.allclose(symmetric(acc), full, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("act_order,sym,damp", [(False, True, 0.01), (True, False, 0.01), (True, True, 0.3)])
def test_reported_error_is_the_layer_wise_loss(act_order, sym, damp):
    """The solver's per-row error (taken from its own loss increments) against (w - q) H (w - q)ᵀ computed
    directly, with a dead input and a rank-deficient Hessian in play."""
    g = torch.Generator().manual_seed(11)
    x = _inputs("correlated", 96, 1024, seed=12)
    x[:, 7] = 0
    w = torch.randn(40, 96, generator=g)
    H = _hessian(x)
    q, info = gptq_quantize(w, H, IntGrid(3, 32, sym), damp=damp, act_order=act_order)
    d = (w - q.dequantize()).double()
    direct = ((d @ H.double()) * d).sum(1)
    assert torch.allclose(info.row_error.double(), direct, rtol=2e-3, atol=1e-6 * float(direct.max()))
    assert torch.allclose(info.row_energy.double(), ((w.double() @ H.double()) * w.double()).sum(1), rtol=1e-4)


def test_row_quadratic_is_w_h_wt_per_row():
    """Panels of the upper triangle (700 columns: three panels, the last one short) against the plain float64
    ((W H) ∘ W) summed."""
    x = _inputs("correlated", 700, 2048, seed=3)
    H = _hessian(x)
    W = torch.randn(33, 700, generator=torch.Generator().manual_seed(4))
    direct = ((W.double() @ H.double()) * W.double()).sum(1)
    assert torch.allclose(row_quadratic(W, H).double(), direct, rtol=1e-4)


def test_non_finite_hessian_falls_back_to_rtn():
    w = torch.randn(16, 32)
    H = torch.full((32, 32), float("nan"))
    q, info = gptq_quantize(w, H, IntGrid(4, 32, True))
    assert info.fallback_rtn
    assert torch.equal(q.codes, rtn_quantize(w, IntGrid(4, 32, True)).codes)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,gs,sym", [(4, 32, False), (3, -1, True), (4, 64, True)])
def test_stacked_rows_solve_like_separate_matrices(act_order, bits, gs, sym):
    """The pipeline solves q/k/v (gate/up) stacked: each row must get what its own matrix would."""
    x = _inputs("correlated", 128, 2048, seed=11)
    H = _hessian(x, torch.float64)
    g = torch.Generator().manual_seed(12)
    ws = [torch.randn(rows, 128, generator=g, dtype=torch.float64) for rows in (48, 16, 16)]
    spec = IntGrid(bits, gs, sym)
    joint, info = gptq_quantize(torch.cat(ws), H, spec, act_order=act_order)
    row = 0
    for w in ws:
        alone, alone_info = gptq_quantize(w, H, spec, act_order=act_order)
        part = joint.rows(torch.arange(row, row + w.shape[0]))
        assert torch.equal(part.codes, alone.codes) and torch.equal(part.scales, alone.scales)
        assert torch.equal(part.zeros, alone.zeros) and torch.equal(part.g_idx, alone.g_idx)
        # the per-linear error the log reports, against the plain definition tr(dW H dW^T) / tr(W H W^T)
        d = w - alone.dequantize(torch.float64)
        want = (torch.trace(d @ H @ d.T) / torch.trace(w @ H @ w.T)).item()
        assert abs(info.rows_error(row, row + w.shape[0]) - want) < 1e-9 * want
        row += w.shape[0]


def test_joint_solves_group_by_hessian_and_grid():
    from llmq.methods.gptq import InputHessians, _joint_solves

    lin = {n: torch.nn.Linear(8, 4) for n in ("q", "k", "v", "o")}
    hs = InputHessians(lin)
    obs = hs.observers()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    for n in ("q", "k", "v"):
        obs[lin[n]](x)  # one tensor read by q, k and v
    obs[lin["o"]](y)
    a, b = IntGrid(4, 8, True), IntGrid(8, 8, True)
    assert _joint_solves(list(lin), hs, dict.fromkeys(lin, a)) == [["q", "k", "v"], ["o"]]
    assert _joint_solves(list(lin), hs, {"q": a, "k": a, "v": b, "o": a}) == [["q", "k"], ["v"], ["o"]]


def test_symmetric_scaled_and_cast_is_the_naive_mirror():
    u = torch.randn(1500, 1500, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    naive = ((u.triu() + u.triu(1).T) * 0.125).to(torch.float32)
    assert torch.equal(symmetric(u, 0.125, torch.float32), naive)
    assert torch.equal(symmetric(u), u.triu() + u.triu(1).T)


def test_a_dropped_hessian_refuses_to_be_read():
    h = Hessian(8)
    h.add(torch.randn(16, 8))
    H = h.H
    h.drop()
    assert h.count == 16 and torch.isfinite(H).all()
    with pytest.raises(RuntimeError):
        h.H


@pytest.mark.parametrize("n", [1, 2, 7, 512, 513, 1100])
def test_flip_in_place_is_flip(n):
    m = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    expected = m.flip(0, 1)
    _flip_in_place(m, panel=256)
    assert torch.equal(m, expected)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """Against the textbook route: inverse, then Cholesky (on the reversal-conjugated matrix it receives)."""
    x = torch.randn(400, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    H = x.T @ x
    J = torch.arange(299, -1, -1)
    mean = H.diagonal().mean()
    U, frac, back = _inverse_factor([H[J[:, None], J].clone()], mean, 0.01)
    Hd = H + 0.01 * mean * torch.eye(300, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert frac == 0.01 and back is None
    assert torch.allclose(U, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [5, 1024, 1500, 2100])
def test_symmetric_in_place_is_symmetric_and_gives_back_half(n):
    u = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = ((u.triu() + u.triu(1).T) * 0.25).to(torch.float32)
    out = symmetric_in_place(u, 0.25)
    assert torch.equal(out, expected)
    assert out.untyped_storage().nbytes() == 4 * n * n


def test_taken_hessian_is_h():
    x = torch.randn(3, 200, 1100, generator=torch.Generator().manual_seed(1))
    h, g = Hessian(1100), Hessian(1100)
    for b in x:
        h.add(b)
        g.add(b)
    assert torch.equal(h.take(), g.H)
    with pytest.raises(RuntimeError, match="dropped"):
        h.H
