"""AutoAWQ's GEMM layout (``quant_method: awq``, ``version: gemm``), read by transformers and vLLM.

Per quantized linear (out x in), 4-bit only, groups along the input dim:
  qweight int32 (in, out/8)          codes packed along the *output* dim, 8 per word, interleaved
  qzeros  int32 (in/group, out/8)    zero points, same packing, stored as they are
  scales  fp16  (in/group, out)
The interleave puts output column order[i] of each block of 8 into nibble i, with
order = [0, 2, 4, 6, 1, 3, 5, 7] (the GEMM kernel's dequantization order).
Zero points are always stored (``zero_point: true``), so symmetric grids are exact too.
"""

from __future__ import annotations

from typing import Any

import torch

from llmq.formats.base import Format, natural_g_idx, refuse, require_int_grid
from llmq.formats.packing import pack, unpack
from llmq.grid import IntGrid
from llmq.qtensor import QuantizedTensor

AWQ_ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """Columns of x (…, out) reordered so that packing sequentially yields the AWQ nibble order."""
    idx = (torch.arange(x.shape[-1]) // 8 * 8).reshape(-1, 8) + AWQ_ORDER
    return x[..., idx.reshape(-1)]


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    idx = (torch.arange(x.shape[-1]) // 8 * 8).reshape(-1, 8) + AWQ_ORDER
    out = torch.empty_like(x)
    out[..., idx.reshape(-1)] = x
    return out


class AWQGemmFormat(Format):
    name = "awq"
    quant_method = "awq"
    suffixes = ("qweight", "qzeros", "scales")

    def check(self, grid: IntGrid) -> None:
        require_int_grid(self.name, grid)
        if grid.bits != 4:
            raise refuse("awq", f"AWQ GEMM stores 4-bit codes only, not {grid.bits}-bit")
        if grid.group_size == -1:
            raise refuse("awq", "AWQ GEMM needs a group size (e.g. 128), not per-channel scales")

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        self.check(qt.grid)
        out, inp = qt.shape
        gs = qt.grid.group_size
        if out % 8 or inp % gs:
            raise refuse("awq", f"a {out}x{inp} linear: AWQ GEMM needs out % 8 == 0 and in % {gs} == 0")
        if not natural_g_idx(qt):
            raise refuse("awq", "codes with an act-order g_idx (AWQ GEMM has no g_idx); use --format gptq")
        return {
            "qweight": pack(_interleave(qt.codes.T), 4, dim=1),
            "qzeros": pack(_interleave(qt.zeros.T), 4, dim=1),
            "scales": qt.scales.T.to(torch.float16).contiguous(),
        }

    def nbytes(self, out: int, inp: int, grid: IntGrid) -> int:
        groups = grid.groups(inp)
        return 4 * (inp * out // 8 + groups * out // 8) + 2 * groups * out

    def unpack(self, tensors: dict[str, torch.Tensor], grid: IntGrid, shape: tuple[int, int]) -> QuantizedTensor:
        out, inp = shape
        return QuantizedTensor(
            codes=_deinterleave(unpack(tensors["qweight"], 4, out, dim=1)).T.contiguous(),
            scales=tensors["scales"].float().T.contiguous(),
            zeros=_deinterleave(unpack(tensors["qzeros"], 4, out, dim=1)).T.contiguous(),
            g_idx=(torch.arange(inp) // grid.group_size).to(torch.int32),
            grid=grid,
        )

    def quantization_config(self, grid: IntGrid, extra: dict[str, Any]) -> dict[str, Any]:
        return {"quant_method": "awq", "bits": 4, "group_size": grid.group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": extra.get("ignore") or None}

    def grid_from_config(self, qcfg: dict[str, Any]) -> IntGrid:
        if str(qcfg.get("version", "gemm")).lower() != "gemm":
            raise refuse("awq", f"AWQ version {qcfg.get('version')!r}; llmq reads the GEMM layout")
        return IntGrid(bits=int(qcfg.get("bits", qcfg.get("w_bit", 4))), group_size=int(qcfg.get("group_size", qcfg.get("q_group_size", 128))),
                         sym=False)
