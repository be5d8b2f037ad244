"""GPTQ (Frantar et al., 2022): quantize columns one at a time, feeding each column's
rounding error forward into the not-yet-quantized columns through the inverse Hessian
of the layer-wise reconstruction loss ||WX - QX||^2, with H = 2/N * sum x x^T.

Blocked "lazy batch" updates keep the work in matrix products; act-order visits columns
by decreasing diag(H) and, with static groups, keeps every group's grid fixed from the
unquantized weights so g_idx stays monotone.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import nn

from llmq.activations import LayerInputs
from llmq.distributed import Ranks
from llmq.dtypes import bf16_products
from llmq.errors import LlmqError
from llmq.grid import Grid, group_index
from llmq.methods.base import Method
from llmq.rounding import rtn_quantize
from llmq.qtensor import QuantizedTensor
from llmq.refit import refit_scales, refits
from llmq.reuse import Reuse

log = logging.getLogger("llmq.gptq")


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # fraction of mean diag(H) added before Cholesky (escalates x10 on failure)
    block_size: int = 128  # columns per lazy-batch update
    act_order: bool = True  # columns by decreasing diag(H), with static groups: lowered KL in every setting measured
    static_groups: bool = False  # group grids fixed from the unquantized weights (implied by act_order)
    true_sequential: bool = True  # each linear group calibrated on the outputs of the quantized groups before it
    # Weight of the unquantized model's outputs in the loss (Hessian.target): 0 is GPTQ's own layer-wise loss
    # |Q x - W x|², 1 the asymmetric |Q x - W x0| of GPTAQ (x0: the unquantized model's input), which also
    # makes up for the error earlier layers left in x; 0.5 averages the two.
    fp_targets: float = 0.0
    # Integer grids: once the codes are chosen, refit each row's group scales to the layer-wise loss
    # (llmq.refit).  Lowered KL by 4-9% at W4/W3/W2 on llmq-ref-6m; off by default until measured more widely.
    refit_scales: bool = False

    def validate(self) -> None:
        if not 0 < self.damp < 1:
            raise LlmqError(f"--damp must be in (0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise LlmqError(f"--block-size must be positive, got {self.block_size}")
        if not 0 <= self.fp_targets <= 1:
            raise LlmqError(f"fp_targets must be in [0, 1], got {self.fp_targets}")


def _panel(n: int) -> int:
    """Rows per panel of an n x n upper triangle: eight panels, each product still large."""
    return max(256, -(-n // 8))


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += the upper triangle (diagonal included) of xᵀx, for x of shape (tokens, n).

    Computed by row panels, x[:, i:i+b]ᵀ x[:, i:], each one matrix product: about 0.56 of the work
    of the whole xᵀx, whose lower half only repeats the upper.  (Entries below the diagonal of ``acc``
    take some products too; they mean nothing: read the upper triangle, as ``symmetric`` does.)"""
    n = x.shape[1]
    b = _panel(n)
    for i in range(0, n, b):
        acc[i : i + b, i:] += x[:, i : i + b].T @ x[:, i:]  # (promoted in place: no float64 copy of the panel)


def symmetric(upper: torch.Tensor, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``upper``'s, times ``scale``, in
    ``dtype`` (default upper's).  Built a row panel at a time in the result's dtype: a float64 Hessian of
    an MLP's down_proj would otherwise pass through several full float64 temporaries."""
    return _mirror_into(torch.empty_like(upper, dtype=dtype or upper.dtype), upper, scale)


def symmetric_in_place(upper: torch.Tensor, scale: float) -> torch.Tensor:
    """``symmetric(upper, scale, torch.float32)`` for a float64 ``upper``, built in upper's own memory, which
    it takes over (upper must not be used again): its first half holds the float32 result, and the
    second half is given back.  Forming a 7B down_proj's H then holds 0.5 GB instead of 1.5 GB.

    Row r of the result occupies the bytes of float64 rows r/2 .. (r+1)/2, which the increasing sweep of
    _mirror_into has read already: each panel is read whole before it is written, and the mirror comes
    after, into the lower triangle, which no panel wrote."""
    n = upper.shape[0]
    out = _mirror_into(upper.view(torch.float32).reshape(-1)[: n * n].view(n, n), upper, scale)
    upper.untyped_storage().resize_(out.numel() * out.element_size())
    return out


def _mirror_into(out: torch.Tensor, upper: torch.Tensor, scale: float) -> torch.Tensor:
    """out = the symmetric matrix of upper's upper triangle times scale: row panels of the upper triangle
    in increasing order, then their mirror (no n x n temporary)."""
    n = upper.shape[0]
    for i in range(0, n, 1024):
        j = min(i + 1024, n)
        panel = (upper[i:j, i:] * scale if scale != 1.0 else upper[i:j, i:]).to(out.dtype)
        block = panel[:, : j - i].triu()
        out[i:j, i:j] = block + block.triu(1).T
        out[i:j, j:] = panel[:, j - i :]
    for i in range(0, n, 1024):
        j = min(i + 1024, n)
        out[j:, i:j] = out[i:j, j:].T
    return out


class Hessian:
    """2/N Σ x xᵀ over the N calibration tokens seen, as a tensor of ``dtype`` (fp32 by default).

    Each batch's x xᵀ is one product in ``dtype``; the products are summed in float64, so sums of
    many batches (and over the ranks of a distributed run, llmq.distributed) lose nothing that
    the ``dtype`` result would show.  Only the upper triangle is accumulated (add_gram)."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32):
        self.n, self.dtype = n, dtype
        self._sum: torch.Tensor | None = None  # allocated on first use: an alias (up_proj reading gate_proj's input) never is
        self.count = 0
        # With unquantized-model inputs x0 paired to the inputs x: Σ x0 xᵀ (float64), and whether
        # every call had its pair (a MoE expert does not: the two models route tokens apart).
        self._cross: torch.Tensor | None = None
        self.paired = True

    @property
    def H(self) -> torch.Tensor:
        if self._sum is None and self.count > 0:
            raise RuntimeError("this Hessian's sums were dropped")
        if self._sum is None or self.count == 0:
            device = None if self._sum is None else self._sum.device
            return torch.zeros(self.n, self.n, dtype=self.dtype, device=device)
        return symmetric(self._sum, 2 / self.count, self.dtype)

    @property
    def sum(self) -> torch.Tensor:
        """Σ x xᵀ (float64)."""
        if self._sum is None:
            return torch.zeros(self.n, self.n, dtype=torch.float64)
        return symmetric(self._sum)

    def take(self) -> torch.Tensor:
        """H, formed in the sums' own memory (symmetric_in_place) and the sums dropped: for the last solve
        that uses them."""
        if self._sum is None or self.count == 0 or self.dtype != torch.float32:
            H = self.H
        else:
            H = symmetric_in_place(self._sum, 2 / self.count)
        self.drop()
        return H

    def drop(self) -> None:
        """Free the float64 sums (count stays): after the last solve has taken H, they only hold memory
        through the solve (a 7B down_proj's take 1 GB)."""
        self._sum = self._cross = None

    def add(self, x: torch.Tensor, x0: torch.Tensor | None = None) -> None:
        # bf16 activations (a bf16 calibration) upcast exactly, so the CPU's bf16 units may multiply them
        exact_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.dtype == torch.float32
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if self._sum is None:  # accumulate where the activations live (CPU or GPU)
            self._sum = torch.zeros(self.n, self.n, dtype=torch.float64, device=x.device)
        elif self._sum.device != x.device:
            self._sum = self._sum.to(x.device)
        self.count += x.shape[0]
        with bf16_products(exact_bf16):
            add_gram(self._sum, x)
        if x0 is None or x0.numel() != x.numel():
            self.paired = False
        elif self.paired:
            if self._cross is None:
                self._cross = torch.zeros_like(self._sum)
            with bf16_products(exact_bf16 and x0.dtype == torch.bfloat16):
                self._cross += (x0.reshape(x.shape).to(self.dtype).T @ x).to(torch.float64)

    def target(self, W: torch.Tensor, weight: float, damp: float) -> torch.Tensor:
        """The weights W' whose GPTQ loss Σ|(Q - W') x|² is, up to a constant, the loss
        (1 - weight) Σ|Q x - W x|² + weight Σ|Q x - W x0|²  (x0: the unquantized model's inputs):
        by the normal equations  W' = W + weight W (Σ x0 xᵀ - Σ x xᵀ)(Σ x xᵀ)⁻¹,  Σ x xᵀ damped as GPTQ
        damps H (written as a correction, so W' = W exactly where x0 = x).  W where inputs were not paired.

        The sums' difference is taken in float64 (they nearly cancel), the solve in H's dtype, as GPTQ's own:
        its products are out x n x n, and in float64 they took longer than the GPTQ solve itself."""
        if weight == 0 or self._cross is None or not self.paired or self.count == 0:
            return W
        # One n x n float64 buffer for the damped Σ x xᵀ and then the difference (at a 7B's down projection
        # each is 1 GB, beside the two sums).
        S = symmetric(self._sum)
        shift = damp * S.diagonal().mean()
        S.diagonal().add_(shift)  # (damped as GPTQ damps H)
        L, info = torch.linalg.cholesky_ex(S.to(self.dtype))
        if info != 0:
            return W
        torch.sub(self._cross, S, out=S)
        S.diagonal().add_(shift)  # S = Σ x0 xᵀ - Σ x xᵀ = Σ (x0 - x) xᵀ
        drift = S.to(self.dtype)
        del S
        delta = torch.cholesky_solve(drift.T @ W.T.to(self.dtype), L).T
        return (W.to(self.dtype) + weight * delta).to(W.dtype)

    def reduce(self, ranks: Ranks, device: torch.device | None = None, to: int | None = None,
               counted: tuple[int, bool] | None = None) -> None:
        """Sum this Hessian over the ranks of a distributed run (every rank calls it, in the same order),
        onto every rank or only onto rank ``to`` (the one that solves it; the others drop theirs).
        ``counted``: the run-wide token count and pairing, if the caller gathered them already."""
        if ranks.world == 1:
            return
        if counted is None:
            parts = ranks.gather_objects((self.count, self.paired and self._cross is not None))
            counted = sum(c for c, _ in parts), all(p for _, p in parts)
        count, paired = counted
        if self._sum is None:  # (this rank's windows never reached the linear)
            self._sum = torch.zeros(self.n, self.n, dtype=torch.float64, device=device)
        self.count, self.paired = count, paired
        self._sum = ranks.sum(self._sum, to)
        if paired:
            self._cross = ranks.sum(self._cross, to)
        if self._sum is None:
            self._cross = None


class InputHessians:
    """The Hessians of a group of linears, one per distinct input tensor: q/k/v (and gate/up)
    read the very same activations in the forward, so one x x^T serves all of them."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self._own = {n: Hessian(m.in_features) for n, m in modules.items()}
        self._alias: dict[str, str] = {}
        # The last input seen and whose Hessian took it; holding the tensor keeps `is` meaningful.
        self._last: tuple[torch.Tensor, str] | None = None
        self._unquantized: dict[str, torch.Tensor] | None = None

    def observers(self, unquantized: dict[str, torch.Tensor] | None = None) -> dict[nn.Module, Callable[[torch.Tensor], None]]:
        """``unquantized``: if given, each module's input in the unquantized model for the batch being run
        (filled by the caller before each batch), accumulated against the actual input (Hessian.target)."""
        self._unquantized = unquantized
        return {m: partial(self._observe, n) for n, m in self.modules.items()}

    def _observe(self, name: str, x: torch.Tensor) -> None:
        last = self._last
        shared = last is not None and x is last[0] and self._own[name].count == 0
        if shared and self._alias.setdefault(name, last[1]) == last[1]:
            return
        if name in self._alias:
            raise RuntimeError(f"{name} read its group's shared input in one forward but not in another")
        self._own[name].add(x, None if self._unquantized is None else self._unquantized.get(name))
        self._last = (x, name)

    def __getitem__(self, name: str) -> Hessian:
        return self._own[self._alias.get(name, name)]

    def release(self) -> None:
        self._last = None

    def merge_aliases(self, ranks: Ranks) -> None:
        """A rank whose windows never reached an expert saw no aliasing there: the aliases are the union
        of what the ranks saw (every rank calls this before the joint solves are formed)."""
        for seen in ranks.gather_objects(self._alias):
            for name, target in seen.items():
                self._alias.setdefault(name, target)

    def reduce(self, ranks: Ranks, device: torch.device | None = None,
               owner: Callable[[str], int | None] | None = None) -> None:
        """Sum every Hessian over the ranks (after merge_aliases): onto every rank, or onto ``owner(name)``
        alone, the rank that solves it (a MoE layer's many expert Hessians then travel once; None: all)."""
        names = sorted(n for n in self._own if n not in self._alias)
        mine = {n: (self._own[n].count, self._own[n].paired and self._own[n]._cross is not None) for n in names}
        parts = ranks.gather_objects(mine)
        for n in names:
            counted = sum(p[n][0] for p in parts), all(p[n][1] for p in parts)
            self._own[n].reduce(ranks, device, None if owner is None else owner(n), counted)

    def owner(self, name: str) -> str:
        """The name whose Hessian ``name`` uses."""
        return self._alias.get(name, name)


@dataclass
class SolveInfo:
    damp: float  # fraction of mean(diag H) that was finally added
    fallback_rtn: bool
    row_error: torch.Tensor  # per output row: (w - q) H (w - q)^T
    row_energy: torch.Tensor  # per output row: w H w^T
    # With keep_updated: the error-compensated weights each code was rounded from (out x in; their
    # nearest grid values are the codes).  Learned rounding starts from them.
    updated: torch.Tensor | None = None

    @property
    def error(self) -> float:
        """Relative reconstruction error tr(dW H dW^T) / tr(W H W^T) of the whole matrix."""
        return self.rows_error(0, self.row_error.numel())

    def rows_error(self, start: int, stop: int) -> float:
        """The same for output rows start:stop (one linear of a stacked solve)."""
        num, den = self.row_error[start:stop].sum(), self.row_energy[start:stop].sum()
        return float(num / den) if den > 0 else float(num)


def _inverse_factor(owned: list[torch.Tensor], mean: torch.Tensor, damp: float
                    ) -> tuple[torch.Tensor | None, float, torch.Tensor | None]:
    """Upper Cholesky factor U of (A + f·mean·I)⁻¹ for A = J Hp J (see _upper_inverse_factor), with f the
    first of damp, 10·damp, ... (up to 1) that gives one.  ``owned``: [A], handed over (popped): A's buffer
    is let go before the inverse's comes, so the solve holds two n x n buffers at most.  Returns U, f, and
    (None if U was found) A undamped, for the fallback."""
    A = owned.pop()
    diag = A.diagonal().clone()
    frac = damp
    while frac <= 1.0 + 1e-9:
        A.diagonal().copy_(diag).add_(frac * mean)
        L, info = torch.linalg.cholesky_ex(A)
        if info == 0:
            del A
            U = _upper_inverse_factor(L)
            if U is not None:
                return U, frac, None
            A = L @ L.T  # (rare: the inverse overflowed; A rebuilt, up to rounding, for more damping)
        del L
        frac *= 10
    A.diagonal().copy_(diag)
    return None, frac, A


def _upper_inverse_factor(L: torch.Tensor) -> torch.Tensor | None:
    """J L⁻¹ J for lower triangular L (J: the order reversal), or None if not finite.

    With J Hp J = L Lᵀ, Hp⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper triangular with a positive
    diagonal, so it is the upper Cholesky factor of Hp⁻¹ (which is unique): one Cholesky and one
    triangular inverse instead of a Cholesky, an inverse and a second Cholesky.  One n x n buffer besides L."""
    # (into a column-major identity: the layout LAPACK solves in, so the solve needs no copy of it)
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device).T
    U = torch.linalg.solve_triangular(L, eye, upper=False, out=eye)
    _flip_in_place(U)
    return U if torch.isfinite(U).all() else None


def _flip_in_place(M: torch.Tensor, panel: int = 256) -> None:
    """M = M.flip(0, 1) without a second n x n buffer: rows i and n-1-i swapped, each reversed."""
    n = M.shape[0]
    half = n // 2
    for i in range(0, half, panel):
        j = min(i + panel, half)
        top = M[i:j].flip(0, 1)
        M[i:j] = M[n - j : n - i].flip(0, 1)
        M[n - j : n - i] = top
    if n % 2:
        M[half] = M[half].flip(0)


def row_quadratic(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per row w of W, w H wᵀ (H symmetric), by row panels of H's upper triangle, as add_gram forms it:
    each panel's block on the diagonal once, the rest of its row twice; about 0.56 of the products
    of the plain ((W H) ∘ W) summed."""
    n = H.shape[0]
    b = _panel(n)
    out = torch.zeros(W.shape[0], dtype=H.dtype, device=H.device)
    for i in range(0, n, b):
        j = min(i + b, n)
        P = W[:, i:j] @ H[i:j, i:]
        out += (P[:, : j - i] * W[:, i:j]).sum(1)
        out += 2 * (P[:, j - i :] * W[:, j:]).sum(1)
    return out


def error_terms(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, the layer-wise loss of Q in place of W, (w - q) H (w - q)^T, and w H w^T."""
    d = (W - Q).to(H.dtype)
    return row_quadratic(d, H), row_quadratic(W.to(H.dtype), H)


def relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    num, den = (t.sum() for t in error_terms(W, Q, H))
    return float(num / den) if den > 0 else float(num)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, static_groups: bool = False, keep_updated: bool = False,
                  refit: bool = False) -> tuple[QuantizedTensor, SolveInfo]:
    """Quantize W (out x in) against Hessian H (in x in). Works in H's dtype.  ``refit``: then refit the
    scales to the codes (llmq.refit; integer grids, and not with ``keep_updated``, whose weights were
    rounded on the scales as they were)."""
    if refit and keep_updated:
        raise ValueError("refit changes the scales the kept updated weights were rounded on")
    dtype, device = H.dtype, H.device
    W0 = W.to(device=device, dtype=dtype)
    if not torch.any(torch.diag(H) > 0):
        # No calibration token reached this linear (an expert the router never picked): there is no
        # error to weigh, and zeroing "dead" columns would erase the whole matrix.  Round to nearest.
        log.info("no calibration input reached this module; rounding it to nearest instead")
        return _rtn_fallback(W0, H, grid, 0.0, keep_updated)
    H0, n = H, W.shape[1]
    H, W, dead = _dead_inputs_set_aside(H, W0)
    # Grids with shared super-scales (GGUF's) are fixed from the unquantized weights first; error
    # feedback then picks the codes.
    static = static_groups or act_order or grid.effective_group_size(n) == n or grid.static
    # diag(H) weighs grids that search their parameters, as llama.cpp's importance matrix does.
    importance = torch.diag(H).clone().masked_fill_(dead, 0)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=device)
    grids = _ColumnGrids.of(grid, W, importance, perm, static)
    # The inverse's factor comes from J Hp J (Hp = H[perm][:, perm], J the order reversal; _upper_inverse_factor),
    # gathered in one go.  Its n x n buffers are the solve's largest: H itself is let go meanwhile (unless the
    # refit needs it, or the caller keeps it), after what is wanted of it later is taken.
    mean_p, mean, energy = H.diagonal()[perm].mean(), float(H.diagonal().mean()), row_quadratic(W0, H0)
    rev = perm.flip(0)
    owned = [H[rev[:, None], rev]]
    if not refit:
        H = H0 = None
    U, used_damp, A = _inverse_factor(owned, mean_p, damp)
    if U is None:
        log.warning("Hessian not positive definite even with damp=1.0; falling back to RTN for this module")
        back = torch.argsort(rev)
        return _rtn_fallback(W0, A[back[:, None], back], grid, used_damp, keep_updated)
    Wt = W.T[perm].contiguous()  # (rows of Wt: the columns of W in the order they are quantized)
    del W
    Qt, Pt, loss = _quantize_columns(Wt, U, grid, grids, importance, block_size, keep_updated)
    del Wt, U
    inv = torch.argsort(perm)
    Q = Qt[inv].T
    del Qt
    qt = QuantizedTensor.from_float_codes(Q.cpu(), grids.scale.cpu(), grids.zero.cpu(), group_index(n, grid), grid,
                                          None if grids.offset is None else grids.offset.cpu(), grids.stored)
    del Q
    updated = None if Pt is None else Pt[inv].T.cpu()
    row_error = _layer_wise_loss(loss, W0, qt.dequantize(dtype).to(device), dead, used_damp * mean)
    if refit and refits(qt):
        qt, change = refit_scales(qt, W0, H0)
        row_error += change
    return qt, SolveInfo(used_damp, False, row_error.clamp_min(0), energy, updated)


def _dead_inputs_set_aside(H: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, W, dead): inputs that were always zero (dead) cannot matter; they get 1 on H's diagonal, so that
    H can be inverted, and 0 in W (copies of both, where there are any)."""
    dead = torch.diag(H) == 0
    if dead.any():
        H, W = H.clone(), W.clone()
        H[dead, dead] = 1
        W[:, dead] = 0
    return H, W, dead


@dataclass
class _ColumnGrids:
    """Each group's grid parameters (out x groups), and the group of each column in the order of the solve.
    Static grids are fitted to the unquantized weights up front; a dynamic group's are filled in when its
    first column comes up (fit)."""

    scale: torch.Tensor
    zero: torch.Tensor
    offset: torch.Tensor | None
    stored: dict[str, torch.Tensor]
    col_group: torch.Tensor  # (in,): group of each permuted column
    group_size: int
    static: bool

    @classmethod
    def of(cls, grid: Grid, W: torch.Tensor, importance: torch.Tensor, perm: torch.Tensor, static: bool) -> _ColumnGrids:
        (out, n), dtype, device = W.shape, W.dtype, W.device
        gs = grid.effective_group_size(n)
        if not static:
            empty = torch.zeros(out, grid.groups(n), dtype=dtype, device=device)
            return cls(empty, empty.clone(), None, {}, perm // gs, gs, False)
        p = grid.fit(W, importance=importance)
        offset = None if p.offset is None else p.offset.to(device=device, dtype=dtype)
        return cls(p.scale.to(device=device, dtype=dtype), p.zero.to(device=device, dtype=dtype), offset, p.stored,
                   perm // gs, gs, True)

    def fit(self, grid: Grid, rows: torch.Tensor, importance: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid of the dynamic group whose first column is ``col``, from its updated weights ``rows``
        (gs x out; dynamic groups mean no act-order, so those columns are in their own order, as importance is)."""
        scale, zero = (t.to(self.scale.dtype) for t in grid.fit_groups(rows.T, importance[col : col + self.group_size]))
        g = int(self.col_group[col])
        self.scale[:, g], self.zero[:, g] = scale, zero
        return scale, zero


def _quantize_columns(Wt: torch.Tensor, U: torch.Tensor, grid: Grid, grids: _ColumnGrids, importance: torch.Tensor,
                      block_size: int, keep_updated: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """GPTQ's loop over the rows of Wt (the columns of W, in the order of the solve; updated in place): each
    rounded on its group's grid, its error spread over the later ones through U, the upper Cholesky factor
    of the damped inverse Hessian.  Returns the codes (as Wt), what each was rounded from (``keep_updated``)
    and, per output row, the sum of OBS's loss increments (w - q)² / U_ii²."""
    n, gs, static = Wt.shape[0], grids.group_size, grids.static
    # Dynamic groups take their grid from the error-updated weights when their first column
    # comes up; aligning blocks to groups keeps those columns fully updated (as in the naive loop).
    bs = block_size if gs >= n else max(gs, block_size // gs * gs)
    Qt = torch.zeros_like(Wt)
    Pt = torch.zeros_like(Wt) if keep_updated else None
    loss = torch.zeros(Wt.shape[1], dtype=Wt.dtype, device=Wt.device)
    # Inside a block, each column's update reaches only the next few columns at once (a sub-block of
    # 16, which then passes its errors on to the rest of the block as one product): the same sums,
    # with less memory traffic than a rank-1 update of the whole block per column.
    sub = 16 if static or gs % 16 == 0 else bs  # (a dynamic group must start a sub-block: fit sees all updates)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()
        # The block's columns' grid parameters, one row per column (a dynamic group's are filled by fit);
        # the loop runs over rows (contiguous), so each step is a handful of vector ops.
        S, Z = grids.scale.T[grids.col_group[i1:i2]], grids.zero.T[grids.col_group[i1:i2]]
        O = None if grids.offset is None else grids.offset.T[grids.col_group[i1:i2]]
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                if not static and col % gs == 0:
                    S[i : i + gs], Z[i : i + gs] = grids.fit(grid, W1[i : i + gs], importance, col)
                w, off = W1[i], None if O is None else O[i]
                q = grid.nearest(w, S[i], Z[i], off)
                Qt[col] = q
                if Pt is not None:
                    Pt[col] = w
                err = (w - grid.value(q, S[i], Z[i], off)) / diag[i]
                W1[i:j2].addr_(U1[i, i:j2], err, alpha=-1)
                Err1[i] = err
            W1[j2:] -= U1[j1:j2, j2:].T @ Err1[j1:j2]
        Wt[i2:] -= U[i1:i2, i2:].T @ Err1
        loss += (Err1 * Err1).sum(0)
    return Qt, Pt, loss


def _layer_wise_loss(loss: torch.Tensor, W0: torch.Tensor, Qd: torch.Tensor, dead: torch.Tensor, lam: float) -> torch.Tensor:
    """Per row, (w - q) H (w - q)ᵀ from the solve's ``loss``.  Each column's OBS increment (w - q)² / [H⁻¹]_ii is
    what its rounding added to the loss (the later columns' updates being optimal), so their sum is
    (W - Q) H' (W - Q)ᵀ exactly, H' being the matrix solved with: H with damping lam·I and 1 on the dead
    diagonal.  Taking those two away gives the layer-wise loss for H itself without another out x n x n product."""
    d = W0 - Qd
    if dead.any():
        d[:, dead] = -Qd[:, dead]  # (W0 as solved: 0 on the dead columns)
    return loss - lam * d.pow_(2).sum(1) - (Qd[:, dead] ** 2).sum(1)


def _rtn_fallback(W: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float,
                  keep_updated: bool = False) -> tuple[QuantizedTensor, SolveInfo]:
    qt = rtn_quantize(W.cpu(), grid)
    return qt, SolveInfo(damp, True, *error_terms(W, qt.dequantize(H.dtype).to(H.device), H),
                         W.float().cpu() if keep_updated else None)


class GPTQ(Method):
    name = "gptq"
    Options = GPTQOptions
    needs_calibration = True
    default_dataset = "c4"  # the GPTQ paper calibrates on C4
    # Set to a dict to collect, per linear, the error-compensated weights its codes were rounded from.
    updated: dict[str, torch.Tensor] | None = None

    def __init__(self, options=None, seed: int = 0, ranks: Ranks = Ranks()):
        super().__init__(options, seed, ranks)
        self._fp_hidden: list[torch.Tensor] | None = None  # the unquantized model's inputs of the current layer

    def follows_unquantized(self) -> bool:
        """Whether the unquantized model's activations are carried along, layer after layer."""
        return self.options.fp_targets > 0

    def replay(self, layer: nn.Module, inputs: LayerInputs) -> None:
        if self.follows_unquantized():
            self._fp_hidden = Unquantized(layer, Unquantized.of_inputs(inputs, self._fp_hidden)).outputs()

    def quantize_layer(self, layer, arch, targets, inputs, log):
        cfg = self.options
        wanted = set(targets)
        steps = arch.sequential if cfg.true_sequential else (tuple(arch.linears()),)
        unquantized = Unquantized.of(layer, inputs, self._fp_hidden) if self.follows_unquantized() else None
        if inputs is not None and len(steps) > 1:  # (each step's pass may take from the ones before)
            inputs.reuse = Reuse(layer, pending={layer.get_submodule(n) for n in wanted})
            inputs.reuse.learn(inputs.hidden[0], inputs.kwargs)
        result = {}
        final = max((at for at, step in enumerate(steps) if wanted.intersection(step)), default=-1)
        for at, step in enumerate(steps):  # (``at``: the joint solves below number theirs ``k``)
            names = [n for n in step if n in wanted]
            if not names:
                continue
            modules = {n: layer.get_submodule(n) for n in names}
            hessians = InputHessians(modules)
            if unquantized is not None and cfg.fp_targets > 0:
                seen: dict[str, torch.Tensor] = {}
                feed = unquantized.feeder(names, seen, last=at == final)
                inputs.run(layer, hessians.observers(seen), on_batch=feed)
            else:
                inputs.run(layer, hessians.observers())
            hessians.release()
            joints = self._reduce(hessians, names, targets, next(iter(modules.values())).weight.device)
            mine = list(self.ranks.deal(joints))
            last = {hessians.owner(joint[0]): k for k, joint in mine}  # the last of this rank's solves using each
            solved = self.ranks.share({k: self._solve(joint, modules, hessians, targets,
                                                      drop=last[hessians.owner(joint[0])] == k) for k, joint in mine})
            for k, joint in enumerate(joints):
                qt, info, seconds = solved[k]
                rows = sum(modules[n].out_features for n in joint)
                row = 0
                for name in joint:
                    linear = modules[name]
                    out = linear.out_features
                    q = qt.rows(torch.arange(row, row + out)) if len(joint) > 1 else qt
                    error = info.rows_error(row, row + out)
                    row += out
                    linear.weight.data = q.dequantize(linear.weight.dtype).to(linear.weight.device)
                    if inputs is not None and inputs.reuse is not None:
                        inputs.reuse.pending.discard(linear)  # (final from here on)
                    result[name] = q
                    if self.updated is not None and info.updated is not None:
                        self.updated[name] = info.updated[row - out : row]
                    log.add(name, error=error, damp=info.damp, fallback_rtn=info.fallback_rtn,
                            seconds=round(seconds * out / rows, 4), tokens=hessians[name].count,
                            **({"solved_with": [n for n in joint if n != name]} if len(joint) > 1 else {}))
            solved = qt = info = None  # (the stacked codes, split above: not held through the next step's solves)
        if unquantized is not None:
            self._fp_hidden = unquantized.outputs()
        return result

    def _reduce(self, hessians: InputHessians, names: list[str], targets: dict[str, Grid],
                device: torch.device) -> list[list[str]]:
        """The step's joint solves, with each one's Hessian summed over the ranks onto the rank it is dealt to."""
        if self.ranks.world == 1:
            return _joint_solves(names, hessians, targets)
        hessians.merge_aliases(self.ranks)
        joints = _joint_solves(names, hessians, targets)
        solvers: dict[str, set[int]] = {}
        for k, joint in enumerate(joints):  # dealt as Ranks.deal deals; a Hessian two ranks solve with goes to all
            solvers.setdefault(hessians.owner(joint[0]), set()).add(k % self.ranks.world)
        hessians.reduce(self.ranks, device, lambda n: next(iter(solvers[n])) if len(solvers.get(n, ())) == 1 else None)
        return joints

    def _solve(self, joint: list[str], modules: dict[str, nn.Linear], hessians: InputHessians,
               targets: dict[str, Grid], drop: bool = False) -> tuple[QuantizedTensor, SolveInfo, float]:
        """One solve: the linears of ``joint`` stacked (they share a Hessian and a grid).  ``drop``: no later
        solve uses this Hessian, so its sums are freed once H is formed."""
        cfg = self.options
        t0 = time.perf_counter()
        W = torch.cat([modules[n].weight.data for n in joint]) if len(joint) > 1 else modules[joint[0]].weight.data
        hessian = hessians[joint[0]]
        W = hessian.target(W, cfg.fp_targets, cfg.damp)
        # (H passed on, not kept here: gptq_quantize lets it go during its inverse)
        qt, info = gptq_quantize(W, hessian.take() if drop else hessian.H, targets[joint[0]], cfg.damp, cfg.block_size,
                                 cfg.act_order, cfg.static_groups, keep_updated=self.updated is not None,
                                 refit=cfg.refit_scales)
        if self.ranks.world > 1:  # (shared with the other ranks: small CPU tensors pickle fastest)
            info = dataclasses.replace(info, row_error=info.row_error.cpu(), row_energy=info.row_energy.cpu())
        return qt, info, time.perf_counter() - t0

    def quantize_alone(self, W: torch.Tensor, H: torch.Tensor, grid: Grid) -> QuantizedTensor:
        o = self.options
        return gptq_quantize(W, H, grid, o.damp, o.block_size, o.act_order, o.static_groups, refit=o.refit_scales)[0]


@dataclass
class Unquantized:
    """A decoder layer as it was before quantization, and the unquantized model's inputs to it."""

    layer: nn.Module
    inputs: LayerInputs
    _tokens: int = 0  # of the batch being fed
    _outputs: list[torch.Tensor] = field(default_factory=list)  # kept by the last feeder's passes

    @staticmethod
    def of(layer: nn.Module, inputs: LayerInputs, hidden: list[torch.Tensor] | None) -> "Unquantized":
        """A copy of ``layer`` (about to be quantized in place) with its unquantized inputs."""
        unquantized = Unquantized(copy.deepcopy(layer), Unquantized.of_inputs(inputs, hidden))
        reuse = Reuse(unquantized.layer)  # (nothing pending: the copy never changes)
        reuse.learn(unquantized.inputs.hidden[0], inputs.kwargs)
        unquantized.inputs.reuse = reuse
        return unquantized

    @staticmethod
    def of_inputs(inputs: LayerInputs, hidden: list[torch.Tensor] | None) -> LayerInputs:
        """``hidden``: the previous layer's unquantized outputs (None at the first layer: the model's own inputs)."""
        return LayerInputs(hidden if hidden is not None else inputs.hidden, inputs.kwargs, inputs.batch_size, inputs.offset)

    def feeder(self, names: list[str], seen: dict[str, torch.Tensor], last: bool = False) -> Callable[[int], None]:
        """A LayerInputs.run ``on_batch`` that puts into ``seen`` the named modules' unquantized inputs of each
        batch.  Only inputs of every token are kept: a MoE expert's routed rows cannot be paired.

        ``last``: no later feeder follows, so each batch's forward runs on to the layer's outputs, which
        ``outputs`` then returns without a pass of its own (and nothing is kept for later passes)."""
        modules = {self.layer.get_submodule(n): n for n in names}
        bs = self.inputs.batch_size
        if last and self.inputs.reuse is not None:
            self.inputs.reuse.last_pass = True

        def store(name: str, x: torch.Tensor) -> None:
            if x.reshape(-1, x.shape[-1]).shape[0] == self._tokens:
                seen[name] = x

        def on_batch(b: int) -> None:
            seen.clear()
            i = b * bs - self.inputs.offset
            one = LayerInputs(self.inputs.hidden[i : i + bs], self.inputs.kwargs, bs, b * bs, self.inputs.reuse,
                              self.inputs._single_call)
            self._tokens = sum(h.shape[0] * h.shape[1] for h in one.hidden)
            y = one.run(self.layer, {m: partial(store, n) for m, n in modules.items()}, keep_outputs=last)
            if last:
                self._outputs.extend(y)

        return on_batch

    def outputs(self) -> list[torch.Tensor]:
        """The unquantized layer's outputs: the next layer's unquantized inputs (its last pass, unless the
        last feeder's passes kept them)."""
        if len(self._outputs) == len(self.inputs.hidden):
            outputs, self._outputs = self._outputs, []
        else:
            outputs = self.inputs.run(self.layer, keep_outputs=True)
        if self.inputs.reuse is not None:
            self.inputs.reuse.close()  # (what it kept, spill file included, is not needed again)
        return outputs  # type: ignore[return-value]


def _joint_solves(names: list[str], hessians: InputHessians, targets: dict[str, Grid]) -> list[list[str]]:
    """Linears that share a Hessian and a grid, grouped for one solve.

    GPTQ treats every output row alone (same H, same column order, its own error feedback), so
    stacking q/k/v (or gate/up) into one matrix gives each row exactly what a solve of its own
    would, with one Cholesky and one column loop instead of several.
    """
    groups: dict[tuple[int, Grid], list[str]] = {}
    for n in names:
        if targets[n].rows_independent:
            groups.setdefault((id(hessians[n]), targets[n]), []).append(n)
        else:  # a grid fitted on the whole tensor: each linear alone
            groups[(id(hessians[n]), n)] = [n]
    return list(groups.values())
