"""Round-to-nearest: every group gets its min/max (or absmax) grid, every weight its nearest code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmq.grid import QuantSpec, fit_grid, group_index, gguf_reference_codes, quantize
from llmq.methods.base import Method
from llmq.qtensor import QuantizedTensor


def rtn_quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    out, inp = w.shape
    p = fit_grid(w, spec)
    if spec.block is not None and not spec.block.super_block:
        # legacy GGUF blocks: llama.cpp's own rounding, so RTN files match llama-quantize byte for byte
        gs, groups = spec.effective_group_size(inp), spec.groups(inp)
        wp = F.pad(w.float(), (0, groups * gs - inp)).reshape(out * groups, gs)
        q = gguf_reference_codes(wp, spec).reshape(out, groups * gs)[:, :inp]
    else:
        scale, zero, offset = p.per_column(inp, spec)
        q = quantize(w.float(), scale, zero, spec.maxq, offset)
    return QuantizedTensor.from_float_codes(q, p.scale, p.zero, group_index(inp, spec), spec, p.offset)


class RTN(Method):
    name = "rtn"

    def quantize_layer(self, layer, arch, targets, inputs, log):
        result = {}
        for name, spec in targets.items():
            linear = layer.get_submodule(name)
            w = linear.weight.data
            qt = rtn_quantize(w.cpu(), spec)  # QuantizedTensors live on the CPU, where formats pack them
            linear.weight.data = qt.dequantize(w.dtype).to(w.device)
            # Without activations the only error RTN can report is the weights' own.
            log.add(name, weight_error=float(((linear.weight.data - w).float().pow(2).sum() / w.float().pow(2).sum().clamp(min=1e-30))))
            result[name] = qt
        return result
