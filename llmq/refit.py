"""Scale refit: with a linear's codes fixed, the group scales that minimise its layer-wise loss.

GPTQ chooses codes against scales fixed beforehand (min/max or the grid search).  Once the codes
are chosen, the loss  (w - q(γ)) H (w - q(γ))ᵀ  of an output row is a quadratic in the factors γ_g
its group scales are multiplied by, since every dequantized value of group g is
scale_g · (code - zero):

    q(γ) = Σ_g γ_g c_g     (c_g: the row's dequantized values in group g, zero elsewhere)
    loss(γ) = w H wᵀ - 2 γᵀb + γᵀAγ,   A_gh = c_g H c_hᵀ,   b_g = c_g H wᵀ

so the best γ solves one G x G system per row (G groups).  γ = 1 is the result before the refit; a
row takes its new scales only if they lower its loss once rounded to the grid's stored scale dtype
(judged with A and r = b - A·1: no further product).  Codes and zero points are untouched, so the result is
on the same grid and exports as any other.

Measured (eval/results/refit-llmq-ref-6m.md): it lowered KL after GPTQ at W4, W3 and W2, with and
without fp_targets (by 4-9%), for about one more out x n x n product per linear.
"""

from __future__ import annotations

import torch

from llmq.grid import IntGrid
from llmq.qtensor import QuantizedTensor, group_dot


def refits(qt: QuantizedTensor) -> bool:
    """Whether this tensor's scales can be refitted: its values are scale · (code - zero) on an integer grid."""
    return isinstance(qt.grid, IntGrid) and qt.offsets is None and not qt.stored


def normal_equations(D: torch.Tensor, R: torch.Tensor, H: torch.Tensor, g_idx: torch.Tensor,
                     groups: int, group_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, G, G) above and r = b - A·1 (rows, G), r_g = c_g H (w - q)ᵀ, for dequantized values D and
    residuals R = W - D (rows x n): one product of (rows x |g|) by (|g| x n) per group, about the work
    of one D H.  r is summed from the residuals themselves: b and A·1 nearly cancel, and their
    difference in float32 would be mostly rounding.  ``group_width`` as QuantizedTensor's (0: groups
    found by g_idx): the rows' sums over each group are then batched dot products."""
    rows = D.shape[0]
    A = torch.zeros(rows, groups, groups, dtype=H.dtype, device=H.device)
    r = torch.zeros(rows, groups, dtype=H.dtype, device=H.device)
    for g in range(groups):
        if group_width:
            cols = slice(g * group_width, (g + 1) * group_width)
        else:
            cols = (g_idx == g).nonzero().squeeze(1)
            if cols.numel() == 0:
                continue
        T = D[:, cols] @ H[cols]  # (rows, n): c_g H for every row
        r[:, g] = torch.einsum("rn,rn->r", T, R)
        A[:, g] = group_dot(T, D, group_width, g_idx, groups)
    return A, r


def refit_scales(qt: QuantizedTensor, W: torch.Tensor, H: torch.Tensor,
                 ridge: float = 1e-6) -> tuple[QuantizedTensor, torch.Tensor]:
    """``qt`` with each row's group scales refitted to W (out x in) under H (in x in, symmetric) where that
    lowers the row's loss, and by how much each row's loss changed (≤ 0).  ``ridge``: relative damping of
    each system, which pulls towards the scales as they were (a group whose codes all sit at the zero
    point has no say and keeps its scale)."""
    dtype, device = H.dtype, H.device
    g_idx = qt.g_idx.long().to(device)
    old = qt.scales.to(device=device, dtype=dtype)
    D = qt.dequantize(dtype).to(device)
    A, r = normal_equations(D, W.to(device=device, dtype=dtype) - D, H, g_idx, old.shape[1], qt.group_width)
    del D
    # Solved for γ - 1:  A (γ - 1) = r.
    lam = ridge * A.diagonal(dim1=1, dim2=2).mean(1).clamp_min(torch.finfo(dtype).tiny)
    damped = A.clone()
    damped.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    delta, singular = torch.linalg.solve_ex(damped, r.unsqueeze(2))
    # A row whose system is singular in floating point even so (inputs of lower rank than its groups: every
    # token alike, say) keeps its scales: the ridge is too small to lift it, and no larger one is right.
    delta = delta.squeeze(2).nan_to_num_(0.0).masked_fill_((singular != 0)[:, None], 0.0)
    grid: IntGrid = qt.grid  # type: ignore[assignment]
    scales = grid.stored(old * (1 + delta).clamp(0.5, 2.0)).to(dtype)
    d = scales / old - 1  # the γ - 1 actually stored (grid scales are never 0)
    change = (d * (A @ d.unsqueeze(2)).squeeze(2)).sum(1) - 2 * (d * r).sum(1)  # loss(1 + d) - loss(1)
    keep = change < 0
    scales = torch.where(keep[:, None], scales, old).float().cpu()
    new = QuantizedTensor(qt.codes, scales, qt.zeros, qt.g_idx, qt.grid)
    return new, torch.where(keep, change, torch.zeros_like(change))
