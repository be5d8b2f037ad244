"""Round-to-nearest: every group gets the grid's own fit, every weight its nearest code."""

from __future__ import annotations

import torch

from llmq.grid import Grid, group_index
from llmq.methods.base import Method
from llmq.qtensor import QuantizedTensor

ROWS_AT_ONCE = 1 << 22  # weights rounded per step: rows are independent, so big embeddings stay cheap


def rtn_quantize(w: torch.Tensor, grid: Grid) -> QuantizedTensor:
    out, inp = w.shape
    rows = max(1, ROWS_AT_ONCE // inp)
    if not grid.rows_independent:
        p = grid.fit(w.float())
        return QuantizedTensor.from_float_codes(grid.codes(w.float(), p), p.scale, p.zero, group_index(inp, grid), grid,
                                                p.offset, p.stored)
    codes, scales, zeros, offsets = [], [], [], []
    for part in w.split(rows):  # (a bf16 embedding is widened a slice at a time)
        p = grid.fit(part.float())
        codes.append(grid.codes(part.float(), p).to(torch.uint8))
        scales.append(p.scale)
        zeros.append(p.zero)
        offsets.append(p.offset)
    offset = None if offsets[0] is None else torch.cat(offsets)
    return QuantizedTensor.from_float_codes(torch.cat(codes), torch.cat(scales), torch.cat(zeros), group_index(inp, grid),
                                            grid, offset)


class RTN(Method):
    name = "rtn"

    def quantize_layer(self, layer, arch, targets, inputs, log):
        result = {}
        for name, grid in targets.items():
            linear = layer.get_submodule(name)
            w = linear.weight.data
            qt = rtn_quantize(w.cpu(), grid)  # QuantizedTensors live on the CPU, where formats pack them
            linear.weight.data = qt.dequantize(w.dtype).to(w.device)
            # Without activations the only error RTN can report is the weights' own.
            log.add(name, weight_error=float(((linear.weight.data - w).float().pow(2).sum() / w.float().pow(2).sum().clamp(min=1e-30))))
            result[name] = qt
        return result
