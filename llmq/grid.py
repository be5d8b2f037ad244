"""Quantization grids: the values a weight may take, as every method sees them.

A weight w of one (row, group) is represented as  w ~= scale * (q - zero) [+ offset]  with an
integer code q in [0, 2**bits - 1].  :class:`Grid` is the interface methods program against;
:class:`IntGrid` is the generic integer grid (symmetric: zero fixed at 2**(bits-1), the GPTQ
convention, or with ``full_range`` AutoRound's, its scale signed; asymmetric: [min, max] of the group,
no offset; with ``search``, that range shrunk to the least importance-weighted error).  File formats
with grids of their own (GGUF's block types) implement the same interface in their own package.  Scales are rounded
to what will be stored *before* any code is chosen, so what a method optimises is exactly what a
format later writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)
# The ranges a grid search tries, as fractions of a group's min/max range.  Shallow on purpose: measured
# on trained models (eval/results/grid-search.md), clipping deeper than ~15% lowered the weighted
# weight error further but raised the model's KL at 3 and 2 bits under GPTQ: the largest weights of a
# group matter more to the output than their share of the layer-wise error says.
SHRINK_FACTORS = tuple(1 - 0.025 * k for k in range(7))  # 1, 0.975, ..., 0.85


@dataclass
class GridParams:
    """Per (row, group): w = scale * (q - zero) + offset (offset None: zero), or what the grid's ``value`` makes of
    them.  ``stored``: what a grid keeps besides (bitsandbytes' double-quantized absmax codes)."""

    scale: torch.Tensor
    zero: torch.Tensor
    offset: torch.Tensor | None = None
    stored: dict[str, torch.Tensor] = field(default_factory=dict)

    def per_column(self, in_features: int, grid: "Grid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scale, zero, offset) of every column (out x in), for rounding whole matrices at once."""
        gs = grid.effective_group_size(in_features)

        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(gs, dim=1)[:, :in_features]

        return expand(self.scale), expand(self.zero), None if self.offset is None else expand(self.offset)


class Grid(ABC):
    """``bits``-bit codes with one scale (zero, offset) per ``group_size`` input columns (-1: per row)."""

    bits: int
    group_size: int
    # True: the parameters must be fixed from the unquantized weights before any code is chosen (a
    # grid whose groups share quantized super-scales); False: a method may fit each group as it goes.
    static: bool = False
    # False: the parameters of a row depend on other rows (a whole tensor's statistics), so a matrix may be
    # neither split into row slices nor stacked with another before it is fitted.
    rows_independent: bool = True

    @property
    @abstractmethod
    def name(self) -> str:
        """What logs and records call this grid (e.g. 'int4 g128 sym', or a file format's type name)."""

    @property
    def sym(self) -> bool:
        return True

    @property
    def has_offsets(self) -> bool:
        return False

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def uniform(self) -> bool:
        """Whether neighbouring codes are one step (``value(zero + 1) - value(zero)``) apart everywhere:
        what learned rounding needs to move a weight by a fraction of a step."""
        return True

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (the last one may be partial)."""
        return -(-in_features // self.effective_group_size(in_features))

    def fits(self, in_features: int) -> bool:
        """Whether rows of this width can be stored on this grid."""
        return True

    def for_width(self, in_features: int) -> "Grid | None":
        """This grid as a linear of ``in_features`` columns is stored on (None: it cannot be)."""
        return self if self.fits(in_features) else None

    @abstractmethod
    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GridParams:
        """The grid of a whole (out x in) matrix: (out x groups) parameters.  ``importance`` (in,),
        e.g. diag(H), may weigh the fit where the grid searches its parameters."""

    def fit_groups(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero for each row of ``w`` (rows x group columns): one group fitted on its own, as
        GPTQ's dynamic groups need (``importance``: the group's columns' weights, as in ``fit``).  Only
        grids that are not ``static`` support it."""
        raise NotImplementedError(f"the {self.name} grid is fixed from the whole matrix")

    def nearest(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The code (as float) nearest to each value of ``w``; parameters broadcast against it."""
        return quantize(w, scale, zero, self.maxq, offset)

    def value(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """What codes ``q`` stand for: the inverse of ``nearest`` on the grid's values."""
        return dequantize(q, scale, zero, offset)

    def codes(self, W: torch.Tensor, params: GridParams) -> torch.Tensor:
        """Round-to-nearest codes (as float) of W on ``params`` (a format may round its own way, see GGUF's legacy types)."""
        scale, zero, offset = params.per_column(W.shape[1], self)
        return self.nearest(W.float(), scale, zero, offset)


@dataclass(frozen=True)
class IntGrid(Grid):
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    sym: bool = True  # type: ignore[assignment]
    scale_dtype: torch.dtype = torch.float16
    # Search each group's range for the least (importance-weighted) error instead of taking its min/max.
    # How a grid is fitted, not what it stores: grids that differ only here compare equal.
    search: bool = field(default=False, compare=False)
    # Symmetric grids only: each group's extreme of larger magnitude on the end level −2**(bits-1), the
    # scale's sign choosing which side (AutoRound's int_sym; llama.cpp's legacy blocks alike), instead of
    # GPTQ's ±absmax spread over 2**bits − 1 steps, whose top level falls a step short of absmax and bottom
    # one past −absmax.  Steps (2**bits − 1) / 2**bits as wide: 7/8 at 3 bits, 3/4 at 2.  The same zero and
    # file layout (eval/results/full-range.md).
    full_range: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group size must be -1 (per channel) or positive, got {self.group_size}")

    @property
    def signed(self) -> bool:
        """Whether this grid's scales may be negative: a full-range symmetric grid (asymmetric ones ignore it)."""
        return self.sym and self.full_range

    @property
    def name(self) -> str:
        return f"int{self.bits} {'per-channel' if self.group_size == -1 else f'g{self.group_size}'} {'sym' if self.sym else 'asym'}"

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GridParams:
        # Zero padding of a partial last group leaves its grid unchanged: these grids always span 0
        # (and the padded columns weigh nothing in a search: their error is 0).
        out, n = W.shape
        gs, groups = self.effective_group_size(n), self.groups(n)
        wp = F.pad(W.float(), (0, groups * gs - n)).reshape(out, groups, gs)
        imp = None if importance is None else F.pad(importance.float(), (0, groups * gs - n)).reshape(groups, gs)
        # Row slices bound the search's temporaries (a few copies of the slice, not of W).
        parts = [self.fit_groups(wp[i : i + 256], imp) for i in range(0, out, 256)]
        scale, zero = (torch.cat(t) for t in zip(*parts))
        return GridParams(scale.reshape(out, groups), zero.reshape(out, groups))

    def fit_groups(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero of each group: ``w`` is (..., group columns).  [min, max] of the group (spanning 0),
        or its absmax when symmetric (full range: its larger extreme, _range); with ``search``, that range shrunk
        (or mirrored) by the factor that minimises
        the group's error  Σ importance (w - dequantized w)²  (``importance`` broadcasts against w; None:
        all ones).  fp32 scale exactly representable in ``scale_dtype``, integer-valued fp32 zero."""
        w = w.float()
        wmin, wmax = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        if self.sym and not self.signed:
            wmax = torch.maximum(wmin.abs(), wmax)
            wmin = -wmax
        dead = (wmin == 0) & (wmax == 0)  # an all-zero group: any scale works, keep it finite
        wmin = torch.where(dead, -torch.ones_like(wmin), wmin)
        wmax = torch.where(dead, torch.ones_like(wmax), wmax)
        if not self.search:
            return self._range(wmin, wmax)
        return self._searched(w, wmin, wmax, importance)

    def stored(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` as the formats store it: finite, nonzero and rounded to ``scale_dtype`` (as float32); its
        sign kept (a full-range grid's negative scales), 0 taken as positive."""
        finfo = torch.finfo(self.scale_dtype)
        magnitude = scale.abs().clamp(min=finfo.tiny, max=finfo.max)
        return torch.where(scale < 0, -magnitude, magnitude).to(self.scale_dtype).float()

    def _range(self, wmin: torch.Tensor, wmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid spanning [wmin, wmax] (each spans 0), its scale rounded to what is stored; full range:
        the one whose level −2**(bits-1) is the larger in magnitude of wmin and wmax (ties: wmin)."""
        half = (self.maxq + 1) / 2  # (a symmetric grid's zero)
        if self.signed:  # (the larger extreme −half steps from the zero)
            scale = self.stored(torch.where(-wmin >= wmax, -wmin, -wmax) / half)
        else:
            scale = self.stored((wmax - wmin) / self.maxq)
        if self.sym:
            return scale, torch.full_like(scale, half)
        return scale, torch.round(-wmin / scale).clamp(0, self.maxq)

    def _searched(self, w: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor,
                  importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every factor in SHRINK_FACTORS for every group; min/max (factor 1) is tried first and kept on
        ties, so a group that no shrinking helps (or that weighs nothing) keeps its min/max grid.  A full-range
        grid also tries each range mirrored: the smaller extreme's side on the end level, the larger one's
        clipped to (2**(bits-1) − 1) steps (at 2 bits, [−2, 1] steps either way round)."""
        best_f, best = torch.ones_like(wmin), torch.full_like(wmin, float("inf"))
        mirrored = torch.zeros_like(wmin, dtype=torch.bool)
        for f in SHRINK_FACTORS:
            for mirror in (False, True) if self.signed else (False,):
                lo, hi = (-wmax * f, -wmin * f) if mirror else (wmin * f, wmax * f)
                scale, zero = (t[..., None] for t in self._range(lo, hi))
                # dequantize(quantize(w)) - w, in place on one temporary: the same values as the primitives
                # give (a scale here is never 0), at a third of their memory traffic.
                d = (w / scale).round_().add_(zero).clamp_(0, self.maxq).sub_(zero).mul_(scale).sub_(w)
                e = (d.square_() if importance is None else d.square_().mul_(importance)).sum(-1)
                better = e < best
                best, best_f = torch.where(better, e, best), best_f.masked_fill(better, f)
                mirrored = mirrored.masked_fill(better, mirror)
        lo, hi = wmin * best_f, wmax * best_f
        return self._range(torch.where(mirrored, -hi, lo), torch.where(mirrored, -lo, hi))


# ---- primitives ----------------------------------------------------------------------

def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
             offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid; parameters broadcast against w.

    A zero scale (an all-zero block) maps everything to the zero point."""
    if offset is not None:
        w = w - offset
    return torch.clamp(torch.round(torch.nan_to_num(w / scale, nan=0.0, posinf=0.0, neginf=0.0)) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    # The operation order matters: it is llama.cpp's (d * q + m), so values match its bit for bit.
    w = scale * (q - zero)
    return w if offset is None else w + offset


def group_index(in_features: int, grid: Grid) -> torch.Tensor:
    """g_idx for the natural (static) column order: column j belongs to group j // gs."""
    return (torch.arange(in_features) // grid.effective_group_size(in_features)).to(torch.int32)
