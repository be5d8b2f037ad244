"""FP32/FP16/BF16 "methods": no quantization, the whole checkpoint is cast to one dtype.

They exist so the report lists the float baselines through the same pipeline.
"""

from __future__ import annotations

from llmq.methods.base import Method


class _Cast(Method):
    quantizes = False

    def quantize_layer(self, layer, arch, targets, inputs, log):
        return {}


class FP32(_Cast):
    name = "fp32"
    dtype = "float32"


class FP16(_Cast):
    name = "fp16"
    dtype = "float16"


class BF16(_Cast):
    name = "bf16"
    dtype = "bfloat16"
