"""bitsandbytes' grids: NF4 and FP4 (16-value code tables scaled by each block's absmax, the absmax itself
optionally quantized again: double quantization) and LLM.int8 (int8 per output row).

They are grids like any other (llmq.grid.Grid), so every method can target them.  Their parameters are
fixed from the unquantized weights (``static``), and rounded to what bitsandbytes stores before any code
is chosen; RTN rounds as bitsandbytes' own quantize_4bit / int8_vectorwise_quant do, byte for byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from llmq.grid import Grid, GridParams

# bitsandbytes' 4-bit code tables (QLoRA's NormalFloat, and a 1-2-1 float), normalised to [-1, 1].
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
INV127 = 7.874015718698502e-3  # bitsandbytes dequantizes int8 by this product, not by a division
NESTED_BLOCK = 256  # double quantization: absmax values per block of the second level


def code_table(quant_type: str) -> torch.Tensor:
    t = torch.tensor(NF4 if quant_type == "nf4" else FP4, dtype=torch.float32)
    return t / t.abs().max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (what double quantization rounds the absmax values to): for each
    of 7 decades, the midpoints of 2**i + 1 steps from 0.1 to 1, both signs, then 0 and 1, sorted."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@dataclass(frozen=True)
class NestedAbsmax:
    """The absmax values of a double-quantized tensor: 8-bit codes against per-256 fp32 absmax, plus an offset."""

    codes: torch.Tensor  # uint8, one per block of the 4-bit tensor
    absmax: torch.Tensor  # fp32, one per 256 codes
    offset: float

    def values(self) -> torch.Tensor:
        """What bitsandbytes computes from them: code[q] * absmax2 + offset, in fp32."""
        n = self.codes.numel()
        scaled = dynamic_map()[self.codes.long()]
        per = torch.repeat_interleave(self.absmax, NESTED_BLOCK)[:n]
        return scaled * per + torch.tensor(self.offset, dtype=torch.float32)

    @staticmethod
    def of(absmax: torch.Tensor) -> "NestedAbsmax":
        """bitsandbytes' double quantization of a flat fp32 absmax vector."""
        offset = absmax.mean()
        x = absmax - offset
        n = x.numel()
        pad = -n % NESTED_BLOCK
        blocks = torch.nn.functional.pad(x, (0, pad)).reshape(-1, NESTED_BLOCK)
        amax = blocks.abs().amax(dim=1)
        scaled = torch.clamp(blocks * (1 / amax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
        code = dynamic_map()
        q = (scaled[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)
        return NestedAbsmax(q, amax, float(offset))


@dataclass(frozen=True)
class FourBitGrid(Grid):
    """NF4/FP4: w = table[q] * the absmax of its block of ``blocksize`` (64) values of the flattened tensor.

    Where rows are whole blocks, a block is a group of the row (``group_size`` = blocksize); where they are not
    (bitsandbytes lets blocks run across rows), the grid is ``flat``: every value carries its block's absmax
    (groups of one value), which is how such tensors are quantized, read and written."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    flat: bool = False
    bits: int = field(default=4, init=False)
    static = True

    @property
    def group_size(self) -> int:  # type: ignore[override]
        return 1 if self.flat else self.blocksize

    @property
    def name(self) -> str:
        return self.quant_type.upper() + (" double-quant" if self.double_quant else "")

    def fits(self, in_features: int) -> bool:
        return self.flat or in_features % self.blocksize == 0

    def for_width(self, in_features: int) -> "FourBitGrid":
        return self if self.fits(in_features) else dataclasses.replace(self, flat=True)

    @property
    def table(self) -> torch.Tensor:
        return code_table(self.quant_type)

    @property
    def rows_independent(self) -> bool:  # type: ignore[override]
        # double quantization's offset is the whole tensor's mean absmax; flat blocks span rows
        return not (self.double_quant or self.flat)

    def block_absmax(self, W: torch.Tensor) -> torch.Tensor:
        """The absmax of each block of the flattened tensor, in bitsandbytes' order."""
        flat = W.float().reshape(-1)
        pad = -flat.numel() % self.blocksize
        return torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, self.blocksize).amax(dim=1)

    def per_group(self, blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Block values as (out, groups) parameters: one per group, or (flat) one per value."""
        out, n = shape
        if self.flat:
            return torch.repeat_interleave(blocks, self.blocksize)[: out * n].reshape(out, n)
        return blocks.reshape(out, n // self.blocksize)

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GridParams:
        """Each block's absmax, as stored: double-quantized when asked (the values bitsandbytes dequantizes with;
        the 8-bit codes, second-level absmax and offset go along in ``stored``)."""
        if not self.fits(W.shape[1]):
            raise ValueError(f"{self.name} needs rows that are a multiple of {self.blocksize}, got {W.shape[1]}")
        blocks = self.block_absmax(W)
        stored = {}
        if self.double_quant:
            nested = NestedAbsmax.of(blocks)
            stored = {"nested_codes": nested.codes, "nested_absmax": nested.absmax, "nested_offset": torch.tensor(nested.offset)}
            blocks = nested.values()
        a = self.per_group(blocks, W.shape)
        return GridParams(a, torch.zeros_like(a), stored=stored)

    @property
    def uniform(self) -> bool:  # type: ignore[override]
        return False  # a table of NF4/FP4 values

    def nearest(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        # bitsandbytes' rule: the value times the absmax's reciprocal, clamped, bucketed between sorted code midpoints
        table = self.table.to(w.device)
        order = torch.argsort(table)
        bounds = (table[order[:-1]] + table[order[1:]]) / 2
        x = torch.clamp(w * (1.0 / scale.clamp(min=1e-38)), -1, 1)
        return order[torch.bucketize(x, bounds)].to(w.dtype)

    def value(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        return self.table.to(q.device)[q.long()] * scale

    def codes(self, W: torch.Tensor, params: GridParams) -> torch.Tensor:
        """Round-to-nearest as bitsandbytes does: against each block's own absmax, also when what is stored is
        its double-quantized value."""
        scale = self.per_group(self.block_absmax(W), W.shape)
        scale = scale if self.flat else scale.repeat_interleave(self.blocksize, dim=1)
        return self.nearest(W.float(), scale, torch.zeros_like(scale))


@dataclass(frozen=True)
class Int8RowGrid(Grid):
    """LLM.int8: q in [-127, 127] per output row, w = q * absmax(row) / 127 (stored: q + 128 as a code)."""

    group_size: int = field(default=-1, init=False)
    bits: int = field(default=8, init=False)
    static = True

    @property
    def name(self) -> str:
        return "LLM.int8"

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GridParams:
        a = W.float().abs().amax(dim=1, keepdim=True)
        return GridParams(a, torch.full_like(a, 128.0))

    def nearest(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        return torch.clamp(torch.round(w * (127.0 / scale.clamp(min=1e-38))), -127, 127) + zero

    def value(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        return (q - zero) * scale * INV127
