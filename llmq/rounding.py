"""Round to nearest: every group gets the grid's own fit, every weight its nearest code.  The primitive
under RTN, under what no calibration reaches (embeddings, heads), and under allocation probes."""

from __future__ import annotations

import torch

from llmq.grid import Grid, group_index
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
