"""Uniform integer quantization grids shared by every method.

A weight w in a group is represented as  w ~= scale * (q - zero)  with integer
q in [0, 2**bits - 1].  Symmetric grids fix zero at 2**(bits-1) (the GPTQ
convention), asymmetric grids fit [min, max] of the group.  Scales are rounded to
the dtype they will be stored in *before* any code is chosen, so what a method
optimises is exactly what a format later writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


# GGUF block grids (llama.cpp's legacy types without a float minimum): codes q in [0, 2**bits),
# w = d * (q - zero) with one fp16 d per block of 32.  Q4_0/Q5_0 take d = m / -2**(bits-1), m the
# block's value of largest magnitude (sign kept), so that value lands exactly on code 0.
GGUF_GRIDS = {"q4_0": 4, "q5_0": 5, "q8_0": 8}


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    sym: bool = True
    scale_dtype: torch.dtype = torch.float16
    grid: str = "minmax"  # or a GGUF block type from GGUF_GRIDS

    def __post_init__(self) -> None:
        if self.grid != "minmax":
            if GGUF_GRIDS.get(self.grid) != self.bits or self.group_size != 32:
                raise ValueError(f"grid {self.grid} has {GGUF_GRIDS.get(self.grid)}-bit codes in blocks of 32")
        elif self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group size must be -1 (per channel) or positive, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (the last one may be partial)."""
        gs = self.effective_group_size(in_features)
        return -(-in_features // gs)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def fit_params(w: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` (rows x group columns).

    ``shrink`` (<= 1) narrows the range, as clipping searches do.  Returns fp32 scale
    (exactly representable in ``spec.scale_dtype``) and an integer-valued fp32 zero.
    """
    w = w.float()
    if spec.grid != "minmax":
        return _fit_gguf(w * shrink, spec)
    wmin = w.amin(dim=1).clamp(max=0) * shrink
    wmax = w.amax(dim=1).clamp(min=0) * shrink
    if spec.sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    dead = (wmin == 0) & (wmax == 0)  # an all-zero group: any scale works, keep it finite
    wmin = torch.where(dead, -torch.ones_like(wmin), wmin)
    wmax = torch.where(dead, torch.ones_like(wmax), wmax)
    scale = (wmax - wmin) / spec.maxq
    finfo = torch.finfo(spec.scale_dtype)
    scale = scale.clamp(min=finfo.tiny, max=finfo.max).to(spec.scale_dtype).float()
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-wmin / scale).clamp(0, spec.maxq)
    return scale, zero


def _fit_gguf(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    half = 2 ** (spec.bits - 1)
    if spec.grid == "q8_0":
        d = w.abs().amax(dim=1) / 127  # codes q + 128, q in [-127, 127]
    else:
        idx = w.abs().argmax(dim=1, keepdim=True)
        d = w.gather(1, idx)[:, 0] / -half
    return d.to(torch.float16).float(), torch.full_like(d, half)


def gguf_reference_codes(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes exactly as llama.cpp's reference quantizer picks them (rows are blocks).

    It rounds against the fp32 d and stores d in fp16, so RTN GGUF files are byte-identical
    to llama-quantize's; the error-feedback methods instead round on the stored grid.
    """
    w = w.float()
    half = 2 ** (spec.bits - 1)
    if spec.grid == "q8_0":
        d = w.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        x = w * inv
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # round half away from zero, as roundf
        return q + 128
    idx = w.abs().argmax(dim=1, keepdim=True)
    d = w.gather(1, idx) / -half
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.trunc(w * inv + (half + 0.5)).clamp(0, 2 * half - 1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid; scale/zero broadcast against w.

    A zero scale (an all-zero GGUF block) maps everything to the zero point."""
    return torch.clamp(torch.round(torch.nan_to_num(w / scale, nan=0.0, posinf=0.0, neginf=0.0)) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def group_index(in_features: int, spec: QuantSpec) -> torch.Tensor:
    """g_idx for the natural (static) column order: column j belongs to group j // gs."""
    return (torch.arange(in_features) // spec.effective_group_size(in_features)).to(torch.int32)
