"""Round-to-nearest: every group gets the grid's own fit, every weight its nearest code."""

from __future__ import annotations

from llmq.methods.base import Method
from llmq.rounding import rtn_quantize

__all__ = ["RTN", "rtn_quantize"]


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
