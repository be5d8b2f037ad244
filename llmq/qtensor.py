"""QuantizedTensor: the seam between methods and formats.

Methods produce integer codes plus per-group scales and zeros; formats only pack
them.  Nothing here knows how the bits end up on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.grid import QuantSpec


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # (out, in) uint8, values in [0, 2**bits - 1]
    scales: torch.Tensor  # (out, groups) fp32, exactly representable in spec.scale_dtype
    zeros: torch.Tensor  # (out, groups) uint8, integer zero points
    g_idx: torch.Tensor  # (in,) int32: group of each input column
    spec: QuantSpec

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        groups = self.scales.shape[1]
        if self.scales.shape != (out, groups) or self.zeros.shape != (out, groups):
            raise ValueError("scales/zeros must be (out_features, groups)")
        if self.g_idx.shape != (inp,):
            raise ValueError("g_idx must have one entry per input column")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w = scale * (q - zero) in fp32, then cast: the one definition every format must reproduce."""
        g = self.g_idx.long()
        w = self.scales[:, g] * (self.codes.float() - self.zeros[:, g].float())
        return w.to(dtype)

    @staticmethod
    def from_float_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, spec: QuantSpec) -> "QuantizedTensor":
        return QuantizedTensor(
            codes=q.round().to(torch.uint8),
            scales=scales.float().contiguous(),
            zeros=zeros.round().to(torch.uint8),
            g_idx=g_idx.to(torch.int32),
            spec=spec,
        )
