"""Checkpoint formats: each packs QuantizedTensors into named tensors and back.

Formats never quantize: they receive codes, scales and zeros from a method.
"""

from __future__ import annotations

from typing import Any

from llmq.formats.bitsandbytes.layout import BitsAndBytesFormat
from llmq.errors import LlmqError
from llmq.formats.awq import AWQGemmFormat
from llmq.formats.base import Format
from llmq.formats.compressed_tensors import CompressedTensorsFormat
from llmq.formats.gptq import GPTQFormat

FORMATS: dict[str, Format] = {f.name: f for f in (GPTQFormat("gptq"), GPTQFormat("gptq_v2"), AWQGemmFormat(),
                                                  CompressedTensorsFormat(), BitsAndBytesFormat())}


def format_for_config(qcfg: dict[str, Any]) -> Format:
    """The reader for a checkpoint's quantization_config (ours or another tool's)."""
    method = qcfg.get("quant_method")
    if method == "gptq":  # one quant_method, two layouts told apart by checkpoint_format
        version = qcfg.get("checkpoint_format", "gptq")
        if version not in ("gptq", "gptq_v2"):
            raise LlmqError(f"GPTQ checkpoint_format {version!r} is not one llmq reads (gptq, gptq_v2)")
        return FORMATS[version]
    for fmt in FORMATS.values():
        if fmt.quant_method == method:
            return fmt
    readable = sorted({f.quant_method for f in FORMATS.values()})
    raise LlmqError(f"checkpoints quantized with {method!r} are not readable by llmq (reads {', '.join(readable)})")


__all__ = ["FORMATS", "Format", "format_for_config"]
