"""The interface of a packed checkpoint format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from llmq.errors import LlmqError
from llmq.grid import QuantSpec
from llmq.qtensor import QuantizedTensor


class Format(ABC):
    name: str  # what --format calls it
    quant_method: str  # quantization_config.quant_method
    suffixes: tuple[str, ...]  # tensors replacing a linear's "weight"; the first marks a packed linear

    def check(self, spec: QuantSpec) -> None:
        """Raise LlmqError, before any work, when this format cannot represent the recipe."""

    @abstractmethod
    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Tensors (by suffix) replacing a linear's 'weight'.  Raises LlmqError if unrepresentable."""

    @abstractmethod
    def nbytes(self, out: int, inp: int, spec: QuantSpec) -> int:
        """Bytes pack() writes for an (out x in) linear: for size projections without packing."""

    @abstractmethod
    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> QuantizedTensor:
        """The inverse of pack for a linear of ``shape`` (out, in)."""

    @abstractmethod
    def quantization_config(self, spec: QuantSpec, extra: dict[str, Any]) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""

    @abstractmethod
    def spec_from_config(self, qcfg: dict[str, Any]) -> QuantSpec:
        """Read back the grid description from ``quantization_config``."""


def natural_g_idx(qt: QuantizedTensor) -> bool:
    """True when column j belongs to group j // group_size (no act-order permutation stored)."""
    n = qt.codes.shape[1]
    gs = qt.spec.effective_group_size(n)
    return bool(torch.equal(qt.g_idx.long(), torch.arange(n) // gs))


def require_plain_grid(fmt: str, spec: QuantSpec) -> None:
    """Layouts with one scale and an integer zero per group cannot hold GGUF grids with float
    minimums or quantized group scales (Q4_1, Q5_1, K-quants)."""
    bt = spec.block
    if bt is not None and (bt.has_min or bt.super_block):
        raise refuse(fmt, f"the {spec.grid.upper()} grid exists only in GGUF files; use --format gguf")


def refuse(fmt: str, why: str) -> LlmqError:
    return LlmqError(f"format {fmt!r} cannot represent this: {why}")
