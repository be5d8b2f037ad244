"""Checkpoint formats: each packs QuantizedTensors into named tensors and back.

Formats never quantize: they receive codes, scales and zeros from a method.
"""

from llmq.formats.base import Format
from llmq.formats.gptq import GPTQFormat

FORMATS: dict[str, Format] = {f.name: f for f in (GPTQFormat(),)}

__all__ = ["FORMATS", "Format"]
