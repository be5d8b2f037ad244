"""Quantization methods.  Each turns the linears of one decoder layer into QuantizedTensors.

A method never knows the output format: it returns codes, scales and zeros on a grid.
"""

from llmq.methods.awq import AWQ, AWQGPTQ
from llmq.methods.base import LayerLog, Method
from llmq.methods.cast import BF16, FP16, FP32
from llmq.methods.gptq import GPTQ
from llmq.methods.rtn import RTN

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, AWQ, AWQGPTQ, FP16, BF16, FP32)}

__all__ = ["METHODS", "LayerLog", "Method"]
