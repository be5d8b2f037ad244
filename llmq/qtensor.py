"""QuantizedTensor: the seam between methods and formats.

Methods produce integer codes plus per-group scales and zeros (and, on GGUF grids with a
float minimum, offsets); formats only pack them.  Nothing here knows how the bits end up
on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmq.grid import Grid


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # (out, in) uint8, values in [0, grid.maxq]
    scales: torch.Tensor  # (out, groups) fp32, exactly what the grid stores
    zeros: torch.Tensor  # (out, groups) uint8, integer zero points
    g_idx: torch.Tensor  # (in,) int32: group of each input column
    grid: Grid
    offsets: torch.Tensor | None = None  # (out, groups) fp32: w = scale * (q - zero) + offset
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # what the grid keeps besides (GridParams.stored)

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        groups = self.scales.shape[1]
        if self.scales.shape != (out, groups) or self.zeros.shape != (out, groups):
            raise ValueError("scales/zeros must be (out_features, groups)")
        if self.offsets is not None and self.offsets.shape != (out, groups):
            raise ValueError("offsets must be (out_features, groups)")
        if self.g_idx.shape != (inp,):
            raise ValueError("g_idx must have one entry per input column")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def group_width(self) -> int:
        """w if column j is in group j // w for every j (the natural column order), else 0 (act-order's
        permutation): then per-group quantities broadcast over (out, groups, w) views instead of gathers."""
        n, groups = self.shape[1], self.scales.shape[1]
        if n % groups:
            return 0
        natural = torch.arange(n, device=self.g_idx.device) // (n // groups)
        return n // groups if torch.equal(self.g_idx.long(), natural) else 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w = scale * (q - zero) [+ offset] in fp32, then cast: the one definition every format must reproduce."""
        g = self.g_idx.long()
        out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        # A few rows at a time: the per-column parameters and fp32 temporaries of a whole matrix would
        # take several times its size (elementwise, so chunking changes no value).
        step = max(1, (1 << 22) // max(1, self.shape[1]))
        for r in range(0, self.shape[0], step):
            rows = slice(r, r + step)
            w = self.grid.value(self.codes[rows].float(), self.scales[rows][:, g], self.zeros[rows][:, g].float(),
                                None if self.offsets is None else self.offsets[rows][:, g])
            out[rows] = w.to(dtype)
        return out

    def rows(self, order: torch.Tensor) -> "QuantizedTensor":
        """The same tensor with its output rows reordered (or a slice of them)."""
        if self.stored and not torch.equal(order.cpu(), torch.arange(self.shape[0])):
            raise ValueError(f"the rows of a {self.grid.name} tensor cannot be reordered or split: its grid spans all of them")
        return QuantizedTensor(codes=self.codes[order], scales=self.scales[order], zeros=self.zeros[order], g_idx=self.g_idx,
                               grid=self.grid, offsets=None if self.offsets is None else self.offsets[order],
                               stored=self.stored)

    @staticmethod
    def from_float_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, grid: Grid,
                         offsets: torch.Tensor | None = None, stored: dict[str, torch.Tensor] | None = None) -> "QuantizedTensor":
        return QuantizedTensor(
            codes=q if q.dtype == torch.uint8 else q.round().to(torch.uint8),
            scales=scales.float().contiguous(),
            zeros=zeros.round().to(torch.uint8),
            g_idx=g_idx.to(torch.int32),
            grid=grid,
            offsets=None if offsets is None else offsets.float().contiguous(),
            stored={k: v.cpu() for k, v in (stored or {}).items()},
        )


def group_scale(x: torch.Tensor, s: torch.Tensor, group_width: int, g_idx: torch.Tensor) -> torch.Tensor:
    """x (out, in) times each column's group value from s (out, groups); group_sum is its adjoint.  With
    consecutive groups a broadcast over a view, else (act-order's permutation) a gather by ``g_idx``."""
    if group_width:
        out, n = x.shape
        return (x.view(out, -1, group_width) * s.unsqueeze(-1)).view(out, n)
    return x * s[:, g_idx.long().to(x.device)]


def group_dot(a: torch.Tensor, b: torch.Tensor, group_width: int, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """group_sum(a * b): with consecutive groups one batched dot product per group, without a * b formed
    (several times faster on a CPU for the refit's (out, in) operands)."""
    if group_width:
        shape = (a.shape[0], -1, group_width)
        return torch.einsum("rgk,rgk->rg", a.reshape(shape), b.reshape(shape))
    return group_sum(a * b, group_width, g_idx, groups)


def group_sum(x: torch.Tensor, group_width: int, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """x (out, in) summed over each group's columns: (out, groups).  ``group_width`` as QuantizedTensor's: with
    consecutive groups a sum over a view, else (act-order's permutation) a scatter by ``g_idx``."""
    if group_width:
        return x.view(x.shape[0], -1, group_width).sum(-1)
    return x.new_zeros(x.shape[0], groups).index_add_(1, g_idx.long().to(x.device), x)
